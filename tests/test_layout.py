"""The card's layout puts a `kernels/` folder at the top level. With the checkout on sys.path it must not
shadow Hugging Face's `kernels` package, which transformers (5.25 on) imports from its activations module."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkout_kernels_do_not_shadow_hugging_face_kernels():
    """With the checkout on sys.path (python -m pytest, a script or REPL in the project root) transformers must
    still import, moecompress imported or not: without the hand-over every model load fails with
    ImportError 'CUDAProperties'."""
    for pre in ("", "import moecompress.kernels; "):
        code = (pre + "import transformers.activations, sys; m = sys.modules.get('kernels'); "
                "print(getattr(m, '__file__', None))")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not r.stdout.strip().startswith(os.path.join(ROOT, "kernels") + os.sep), r.stdout


def test_hand_over_finds_a_package_installed_inside_the_checkout(tmp_path):
    """CI makes its virtual environment as .venv inside the checkout, so the installed package lies below the
    checkout's root: the hand-over must skip only the root's own sys.path entry, not everything beneath it."""
    root = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "kernels"), root / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = root / ".venv" / "lib" / "site-packages"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'installed'\n")
    code = ("import sys; sys.path[:0] = [%r, %r]; import kernels; print(kernels.CUDAProperties, kernels.__file__)"
            % (str(root), str(site)))
    r = subprocess.run([sys.executable, "-c", code], cwd=str(root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["installed", str(site / "kernels" / "__init__.py")], r.stdout
