# examples/ and the CGI benchmark rows: GNU time measures a CGI process's peak RSS (`time -f %M`).
APT_PACKAGES += time
