"""The real-fix corpus: Debian 12's libpng1.6, lua5.4 and c-ares with their CVE patches, one step per fix."""
