import subprocess
import sys


def test_import_does_not_load_torch():
    code = "import sys, clipdiffusion; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_public_name_raises_attribute_error():
    import clipdiffusion

    try:
        clipdiffusion.NoSuchThing
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_cli_without_command_prints_help_and_fails():
    out = subprocess.run([sys.executable, "-m", "clipdiffusion"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "tokens" in out.stdout
