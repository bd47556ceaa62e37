"""The public surface: what `import hybridcls` exposes, and that it stays cheap."""

from __future__ import annotations

import subprocess
import sys


def test_top_level_names_resolve():
    import hybridcls

    assert set(hybridcls.__all__) == {"__version__", "HybridClassifier", "HybridclsError",
                                      "ZeroShotClassifier"}
    from hybridcls import HybridClassifier, ZeroShotClassifier

    assert HybridClassifier.__module__ == "hybridcls.hybrid"
    assert ZeroShotClassifier.__module__ == "hybridcls.zeroshot.classifier"


def test_import_does_not_load_torch():
    code = "import sys, hybridcls, hybridcls.zeroshot.prompts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
