"""Former home of the input-error, atomic-write and input-check helpers (kept only for old imports).

They now live by dependency: :mod:`custom.errors` (standard library), :mod:`custom.atomic` (standard
library), :mod:`custom.checks` (NumPy), and the MONAI wrappers in :mod:`custom.transforms` and
:mod:`custom.handlers`. Nothing in the bundles imports this module; delete it once no caller does.
"""

from custom.atomic import atomic_path, atomic_write_bytes, atomic_write_text, check_writable_dir, sha256_file  # noqa: F401
from custom.checks import check_image, check_label, check_readable, check_same_grid  # noqa: F401
from custom.errors import EXIT_BAD_INPUT, InputError, cli_main, exit_on_input_error, find_input_error, parse_overrides  # noqa: F401
