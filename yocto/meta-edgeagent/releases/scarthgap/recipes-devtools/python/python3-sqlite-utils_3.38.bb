SUMMARY = "Python library for manipulating SQLite databases"
DESCRIPTION = "Python utility functions (and a CLI) for creating and manipulating SQLite databases. \
               The 3.x series: 4.x needs click >= 8.3.1, and scarthgap ships click 8.1.7."
HOMEPAGE = "https://github.com/simonw/sqlite-utils"
BUGTRACKER = "https://github.com/simonw/sqlite-utils/issues"
SECTION = "devel/python"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=86d3f3a95c324c9479bd8986968f4327"

CVE_PRODUCT = "python:sqlite-utils"

SRC_URI[sha256sum] = "1ae77b931384052205a15478d429464f6c67a3ac3b4eafd3c674ac900f623aab"

inherit pypi python_setuptools_build_meta

PYPI_PACKAGE = "sqlite_utils"
UPSTREAM_CHECK_PYPI_PACKAGE = "sqlite-utils"

RDEPENDS:${PN} += "\
    python3-click \
    python3-click-default-group \
    python3-core \
    python3-dateutil \
    python3-json \
    python3-pluggy \
    python3-sqlite-fts4 \
    python3-sqlite3 \
    python3-tabulate \
"

BBCLASSEXTEND = "native nativesdk"
