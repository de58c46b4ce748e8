# examples/ and the CGI benchmark rows: GNU time measures a CGI process's peak RSS (`time -f %M`).
APT_PACKAGES += time
# examples/cgi under nginx: nginx speaks FastCGI only, fcgiwrap runs the CGI script for it.
APT_PACKAGES += nginx fcgiwrap
