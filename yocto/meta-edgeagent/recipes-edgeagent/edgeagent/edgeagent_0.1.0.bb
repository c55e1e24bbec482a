# nooelint: oelint.var.mandatoryvar.HOMEPAGE,oelint.var.suggestedvar.BUGTRACKER,oelint.var.suggestedvar.CVE_PRODUCT,oelint.var.bbclassextend
# (no public homepage or bug tracker yet: the sources are this repository; no CVE product; target only)
SUMMARY = "Log agent for embedded Linux that does not lose a line"
DESCRIPTION = "edgeagent reads the kernel log (/dev/kmsg, pstore) and log files into a durable SQLite spool \
               and forwards it over MQTT or OTLP/HTTP, deleting data only once the other end acknowledged it."
SECTION = "console/utils"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# Build the checkout this layer sits in (yocto/meta-edgeagent inside the
# edgeagent repository). To build a release instead, set SRC_URI and S in a
# bbappend (for example a git:// URL with SRCREV).
EDGEAGENT_SRCDIR := "${@os.path.normpath(d.expand('${THISDIR}/../../../..'))}"
SRC_URI = "\
    file://${EDGEAGENT_SRCDIR}/pyproject.toml;subdir=${BP} \
    file://${EDGEAGENT_SRCDIR}/README.md;subdir=${BP} \
    file://${EDGEAGENT_SRCDIR}/LICENSE;subdir=${BP} \
    file://${EDGEAGENT_SRCDIR}/edgeagent;subdir=${BP} \
    file://${EDGEAGENT_SRCDIR}/packaging;subdir=${BP} \
"

inherit python_setuptools_build_meta systemd update-rc.d useradd

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/edgeagent --no-create-home \
                       --shell ${base_sbindir}/nologin --user-group edgeagent"

SYSTEMD_SERVICE:${PN} = "edgeagent.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

INITSCRIPT_NAME = "edgeagent"
INITSCRIPT_PARAMS = "defaults 90 10"

do_install:append() {
    # The config may name credentials files: readable by root and the agent only.
    install -d ${D}${sysconfdir}/edgeagent
    install -m 0640 ${S}/packaging/edgeagent.toml ${D}${sysconfdir}/edgeagent/edgeagent.toml
    chown root:edgeagent ${D}${sysconfdir}/edgeagent/edgeagent.toml

    if ${@bb.utils.contains('DISTRO_FEATURES', 'systemd', 'true', 'false', d)}; then
        install -d ${D}${systemd_system_unitdir}
        sed -e 's#/usr/bin/edgeagent#${bindir}/edgeagent#' \
            ${S}/packaging/systemd/edgeagent.service > ${D}${systemd_system_unitdir}/edgeagent.service
        chmod 0644 ${D}${systemd_system_unitdir}/edgeagent.service
    fi
    if ${@bb.utils.contains('DISTRO_FEATURES', 'sysvinit', 'true', 'false', d)}; then
        install -d ${D}${INIT_D_DIR}
        install -m 0755 ${S}/packaging/sysvinit/edgeagent ${D}${INIT_D_DIR}/edgeagent
    fi
}

CONFFILES:${PN} = "${sysconfdir}/edgeagent/edgeagent.toml"

# Standard library parts the agent imports (python3-manifest.json), then the
# third-party packages. pyudev is optional (imported only where udevd runs).
RDEPENDS:${PN} += "\
    python3-asyncio \
    python3-compression \
    python3-core \
    python3-crypt \
    python3-ctypes \
    python3-datetime \
    python3-difflib \
    python3-email \
    python3-fcntl \
    python3-io \
    python3-json \
    python3-logging \
    python3-math \
    python3-netclient \
    python3-paho-mqtt \
    python3-resource \
    python3-shell \
    python3-sqlite-utils \
    python3-sqlite3 \
    python3-tenacity \
    python3-tomli-w \
    python3-tomllib \
    python3-zstandard \
"
RRECOMMENDS:${PN} += "python3-pyudev"
