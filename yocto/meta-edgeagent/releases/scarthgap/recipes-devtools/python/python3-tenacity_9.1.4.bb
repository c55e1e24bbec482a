SUMMARY = "Retry code until it succeeds"
DESCRIPTION = "A general-purpose retrying library. Backport for scarthgap: meta-python has it from wrynose on."
HOMEPAGE = "https://github.com/jd/tenacity"
BUGTRACKER = "https://github.com/jd/tenacity/issues"
SECTION = "devel/python"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=175792518e4ac015ab6696d16c4f607e"

CVE_PRODUCT = "python:tenacity"

SRC_URI[sha256sum] = "adb31d4c263f2bd041081ab33b498309a57c77f9acf2db65aadf0898179cf93a"

DEPENDS += "python3-setuptools-scm-native"

inherit pypi python_setuptools_build_meta

RDEPENDS:${PN} += "\
    python3-asyncio \
    python3-core \
    python3-logging \
"

BBCLASSEXTEND = "native nativesdk"
