"""`comind ps` settings: flag over variable over default, and clear errors."""

import argparse
import os
import subprocess
import sys

import pytest

from comind import config
from conftest import ROOT


def ps(*args, env=None):
    return subprocess.run([sys.executable, "-m", "comind", "ps", "--metrics-port", "0", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, env, words", [
    ([], {"COMIND_ROUNDS": "abc"}, "COMIND_ROUNDS must be a positive integer. Received: COMIND_ROUNDS='abc'"),
    (["--rounds", "0"], {}, "--rounds must be a positive integer. Received: --rounds='0'"),
    (["--weighting", "median"], {}, "--weighting must be one of examples, uniform"),
    (["--listen", "nonsense:99999"], {}, "Cannot listen on 'nonsense:99999'"),
    (["--token-file", "/nonexistent/token"], {}, "Cannot read the token file"),
    (["--tls-cert", "/nonexistent/cert"], {}, "COMIND_TLS_CERT and COMIND_TLS_KEY"),
])
def test_bad_settings_fail_at_once_naming_the_setting(args, env, words):
    result = ps(*args, env=env)
    assert result.returncode == 2
    assert words in result.stderr


def test_flag_beats_variable_beats_default():
    parser = argparse.ArgumentParser()
    config.add_options(parser, config.PS_OPTIONS)
    flags = parser.parse_args(["--rounds", "7"])
    values = config.resolve(config.PS_OPTIONS, flags, {"COMIND_ROUNDS": "9", "COMIND_LEASE_SECONDS": "2.5"})
    assert values["rounds"] == 7 and values["lease_seconds"] == 2.5 and values["num_workers"] == 2
