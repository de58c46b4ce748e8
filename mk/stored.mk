# tests/stored: strace kills a handler at its link() (the crash-between-write-and-link test);
# the DPAPI bench row compares with systemd-creds (part of systemd).
APT_PACKAGES += strace
