#!/usr/bin/env bash
# The one C library the build links: libjpeg-turbo's headers and libjpeg (Debian's
# libjpeg62-turbo-dev), for the loader's region / DCT-scaled JPEG decode (csrc/jpeg_region.c).
# Installs it when the header is missing (as root, or through sudo); does nothing otherwise.
set -euo pipefail
if echo '#include <stdio.h>
#include <jpeglib.h>' | cc -E -x c - >/dev/null 2>&1; then
  exit 0
fi
echo "build-deps: installing libjpeg62-turbo-dev (jpeglib.h is missing)"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends libjpeg62-turbo-dev >/dev/null
