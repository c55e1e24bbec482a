SUMMARY = "Python bindings for the Zstandard compression library"
DESCRIPTION = "Python bindings for interfacing with the Zstandard compression library, built as a C extension \
               with the zstd sources it bundles (as meta-python's recipe does). Backport for scarthgap: meta-python has it from \
               walnascar on."
HOMEPAGE = "https://github.com/indygreg/python-zstandard"
BUGTRACKER = "https://github.com/indygreg/python-zstandard/issues"
SECTION = "devel/python"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3ae87c50fd64b6f0942823686871e758"

CVE_PRODUCT = "python:zstandard"

SRC_URI[sha256sum] = "7713e1179d162cf5c7906da876ec2ccb9c3a9dcbdffef0cc7f70c3667a205f0b"

inherit pypi setuptools3

# setup.py builds the C extension (the optional CFFI backend needs cffi at build time and is not built).
RDEPENDS:${PN} += "\
    python3-core \
"

BBCLASSEXTEND = "native nativesdk"
