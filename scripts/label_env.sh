#!/usr/bin/env bash
# Build MONAI Label's own virtual environment (.venv-label) next to the project's .venv.
# MONAI Label 0.8.5 needs torchvision and old pins (numpy<2, jsonschema 3.2, pydicom<3) that the
# project venv must not get, so it lives apart. Usage: scripts/label_env.sh [VENV]  (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-label}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=$PWD/scripts/label_constraints.txt
if [[ -f $VENV/.installed && $VENV/.installed -nt $CONSTRAINTS ]]; then
    echo "$VENV is up to date"; exit 0
fi
start=$(date +%s)
step() { echo "[label_env $(( $(date +%s) - start ))s] $*"; }
[[ -x $VENV/bin/python ]] || $PYTHON -m venv "$VENV"  # an existing venv is updated in place
PIP="$VENV/bin/python -m pip"
# PIP_CONSTRAINT (not -c) so that isolated build environments obey the pins as well
export PIP_CONSTRAINT=$CONSTRAINTS
step "pip, setuptools, wheel"
$PIP install -q --upgrade pip setuptools wheel
step "torch + torchvision (one matching pair)"
$PIP install -q torch torchvision
step "sam2 (MONAI Label dependency) without its CUDA extension"
SAM2_BUILD_CUDA=0 $PIP install -q --no-build-isolation sam2
step "monailabel"
$PIP install -q "monailabel==0.8.5"
# MONAI Label's DICOMweb datastore turns a saved label into DICOM-SEG with dcmqi's itkimage2segimage
step "dcmqi (itkimage2segimage for MONAI Label's DICOM-SEG upload)"
$PIP install -q dcmqi
step "check"
$VENV/bin/python -c "import torch, torchvision, monai, monailabel; from torchvision.ops import nms; import shutil, sys, os; assert shutil.which('itkimage2segimage', path=os.path.dirname(sys.executable)), 'no itkimage2segimage'; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'monai', monai.__version__, 'monailabel', monailabel.__version__)"
touch "$VENV/.installed"
step "done: $(du -sh "$VENV" | cut -f1)"
