# Cryptographic primitives the firmware builds on MicroPython's cryptolib (AES-ECB) and
# hashlib (SHA-256): AES-CCM (aes_ccm), HMAC-SHA256 and HKDF-SHA256 (hkdf).
# MIT licence, (c) serene-module authors.
