"""benchmarks/run_all.py --uv-site: a site directory passes through; a folder of wheels is unpacked into one."""
import subprocess
import sys
import zipfile

from benchmarks.run_all import uv_site_path


def _wheel(path, package, source):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package}/__init__.py", source)
        zf.writestr(f"{package}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    return path


def test_a_site_directory_passes_through(tmp_path):
    (tmp_path / "pkg").mkdir()
    assert uv_site_path(str(tmp_path), tmp_path / "scratch") == str(tmp_path)


def test_a_folder_of_wheels_is_unpacked_into_an_importable_site(tmp_path):
    _wheel(tmp_path / "uvfake_a-1.0-py3-none-any.whl", "uvfake_a", "VALUE = 'a'\n")
    _wheel(tmp_path / "uvfake_b-1.0-py3-none-any.whl", "uvfake_b", "from uvfake_a import VALUE\nBOTH = VALUE + 'b'\n")
    site = uv_site_path(str(tmp_path), tmp_path / "scratch")
    assert site == str(tmp_path / "scratch")
    out = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, uvfake_b; "
                          "print(uvfake_b.BOTH, m.version('uvfake_a'))"],
                         env={"PYTHONPATH": site}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ab", "1.0"]
