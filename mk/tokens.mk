# issue 25: the pass: backend reads a user's store with the real gpg (and the tests build it with
# the real pass); the token seal and token blobs talk PKCS#11, tested against SoftHSM2.
APT_PACKAGES += gnupg pass softhsm2
