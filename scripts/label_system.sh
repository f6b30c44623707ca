#!/usr/bin/env bash
# Debian packages for the clinical round trip of `make test-label` (never `make test`):
# Orthanc (a PACS) with its DICOMweb and GDCM plugins (GDCM transcodes the sample series' JPEG 2000
# for WADO-RS clients) and dicom3tools (dciodvfy validates the DICOM-SEG). Idempotent; needs root
# or sudo only when something is missing.
set -euo pipefail
PACKAGES=(orthanc orthanc-dicomweb orthanc-gdcm dicom3tools)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "label_system: ${PACKAGES[*]} installed"; exit 0
fi
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
echo "label_system: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
