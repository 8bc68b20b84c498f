"""The soak's short form (scripts/soak.py has the long one): 30 s of concurrent streaming and
non-streaming requests across adapters with a fine-tuning job training and clients dropping
streams; no 5xx, 429 with Retry-After past --max-pending, and the server back to idle after.

TANDEM_BIN names the binary (default target/debug/tandem).
"""
import os
import subprocess
import sys

BIN = os.environ.get("TANDEM_BIN", "target/debug/tandem")


def test_short_soak():
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "soak.py")
    r = subprocess.run([sys.executable, script, BIN, "--secs", "30", "--clients", "12", "--max-pending", "8"],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
