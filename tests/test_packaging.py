"""The installed package: lazy imports, the shipped Triton kernels folder, the compiled extension."""

import importlib.machinery
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys

import pytest

import fastflow


def run_python(code, cwd):
    """Run `code` in a fresh interpreter outside the source tree (so only the installed package counts)."""
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_fastflow_loads_neither_triton_nor_the_extension(tmp_path):
    out = run_python(
        "import sys, fastflow\n"
        "fastflow.backends()\n"
        "print('triton' in sys.modules, 'fastflow.kernels' in sys.modules)",
        tmp_path,
    )
    assert out == "False False"


def test_kernels_ship_as_fastflow_kernels(tmp_path):
    origin = run_python("import fastflow.kernels as k; print(k.__file__)", tmp_path)
    assert origin.endswith("__init__.py")
    assert importlib.util.find_spec("fastflow.kernels") is not None


def test_no_generic_top_level_kernels_package():
    # The installed files (wheel RECORD) hold kernels/ only under fastflow/. (An editable install also puts
    # the source root on sys.path, so there `import kernels` resolves to the checkout, as with any flat layout.)
    top_level = {file.parts[0] for file in importlib.metadata.files("fastflow")}
    assert "kernels" not in top_level


def test_extension_is_installed_inside_the_package(tmp_path):
    spec = importlib.util.find_spec("fastflow._C")
    assert spec is not None, "fastflow._C is missing: reinstall with `make install` or `pip install .`"
    assert spec.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert run_python("import fastflow._C as c; print(c.build_info()['version'])", tmp_path) == fastflow.__version__


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
def test_extensions_link_neither_libtorch_nor_shared_cudart(name):
    spec = importlib.util.find_spec(f"fastflow.{name}")
    if spec is None:
        pytest.skip(f"fastflow.{name} is not built here")
    needed = subprocess.run(["ldd", spec.origin], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in needed and "libc10" not in needed
    assert "libcudart.so" not in needed


def test_metadata_and_console_script():
    assert importlib.metadata.version("fastflow") == fastflow.__version__
    scripts = importlib.metadata.entry_points(group="console_scripts", name="fastflow")
    assert [entry.value for entry in scripts] == ["fastflow.cli:main"]
