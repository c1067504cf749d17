"""fed_netgpt/model/base.py: the one-time conversion of the embedded SmolLM2 keeps progress bars off the console."""

from __future__ import annotations

import sys

import pytest
from tqdm import tqdm

from fed_netgpt.model.base import _progress_bars_hidden


def test_a_conversion_shows_no_progress_bar_and_shows_it_when_the_conversion_fails(capsys):
    # Execute: a bare tqdm bar, as transformers' GGUF conversion draws (tqdm imported before TQDM_DISABLE could act)
    with _progress_bars_hidden():
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", disable=False):
            pass
    quiet = capsys.readouterr().err
    with pytest.raises(RuntimeError, match="conversion broke"), _progress_bars_hidden():
        print("what the conversion said", file=sys.stderr)
        raise RuntimeError("conversion broke")
    failed = capsys.readouterr().err

    # Assert: nothing on stderr while it works; what it wrote comes out when it fails
    assert quiet == ""
    assert failed == "what the conversion said\n"
