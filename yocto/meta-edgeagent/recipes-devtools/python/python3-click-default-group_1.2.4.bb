SUMMARY = "click.Group extension that invokes a default command"
DESCRIPTION = "Extends click.Group to invoke a command without an explicit subcommand name. A dependency of sqlite-utils."
HOMEPAGE = "https://github.com/click-contrib/click-default-group"
BUGTRACKER = "https://github.com/click-contrib/click-default-group/issues"
SECTION = "devel/python"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=65eba42bf46c44352304fa7df67c632f"

CVE_PRODUCT = "python:click-default-group"

SRC_URI[sha256sum] = "eb3f3c99ec0d456ca6cd2a7f08f7d4e91771bef51b01bdd9580cc6450fe1251e"

inherit pypi python_flit_core

PYPI_PACKAGE = "click_default_group"
UPSTREAM_CHECK_PYPI_PACKAGE = "click-default-group"

RDEPENDS:${PN} += "python3-click"

BBCLASSEXTEND = "native nativesdk"
