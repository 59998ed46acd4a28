"""Check every family: ``python -m examples.families`` (or ``python -m families`` from a copy of this folder)."""

from __future__ import annotations

import importlib

from masksd import __file__ as masksd_file

package = importlib.import_module(__package__)
print(f"masksd from {masksd_file}")
print(f"{'family':<10} {'adapter lines':>13} {'checks passed':>13} {'loss':>8}")
for name in package.FAMILIES:
    row = package.check_family(name)
    print(f"{row.name:<10} {row.adapter_lines:>13} {row.checks_passed:>13} {row.loss:>8.4f}")
