"""The runtime stays small: `streams` never imports torch or model_export."""
import subprocess
import sys


def test_streams_imports_neither_torch_nor_model_export():
    code = ("import sys, streams.cli, streams.inference, streams.bundle, streams.longterm, "
            "streams.refresher, streams.replay, streams.record, streams.dashboard, streams.bench, "
            "streams.evaluate_stream, streams.demo, streams.quality, streams.online; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'model_export', 'transformers')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
