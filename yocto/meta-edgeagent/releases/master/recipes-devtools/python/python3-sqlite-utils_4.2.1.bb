SUMMARY = "Python library for manipulating SQLite databases"
DESCRIPTION = "Python utility functions (and a CLI) for creating and manipulating SQLite databases."
HOMEPAGE = "https://github.com/simonw/sqlite-utils"
BUGTRACKER = "https://github.com/simonw/sqlite-utils/issues"
SECTION = "devel/python"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=86d3f3a95c324c9479bd8986968f4327"

CVE_PRODUCT = "python:sqlite-utils"

SRC_URI[sha256sum] = "76114b6a5414714e6c70e5fa5c4781b301b590f6951b5da39c8cc60c21382ba1"

inherit pypi python_setuptools_build_meta

PYPI_PACKAGE = "sqlite_utils"
UPSTREAM_CHECK_PYPI_PACKAGE = "sqlite-utils"

# sqlite-utils 4.x declares "Requires-Dist: pip" (only for its `install`
# command). pip is deliberately not in RDEPENDS: a device must not carry a
# package installer, and the library never imports pip.
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
