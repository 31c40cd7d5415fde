"""Converted releases (issue #15): the converter warns when it drops a stored ViT layer and refuses
special-token ids outside the vocabulary (a model that would read garbage for every <|im_start|>)."""
import os

import pytest

import convert_fixtures as fx
from bagel_jax.convert import bagel as bagel_conv
from bagel_jax.convert.cli import main as convert_main
from bagel_jax.convert.common import ConversionError
from bagel_jax.convert.siglip import DroppedLayerWarning


def test_converter_warns_when_it_drops_a_stored_vit_layer(tmp_path):
  src = fx.write_release(str(tmp_path / "rel"))  # its ema file holds 2 ViT layers
  with pytest.warns(DroppedLayerWarning, match=r"stores 2 ViT layers; layer\(s\) \[1\] are not converted"):
    bagel_conv.open_release(src, vit_layers=1)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error", DroppedLayerWarning)
    bagel_conv.open_release(src)  # the default (all stored layers run): no warning


def test_converter_refuses_special_ids_outside_the_vocabulary(tmp_path):
  src = fx.write_release(str(tmp_path / "rel"), tokenizer=False)  # no tokenizer: Qwen's 151644.. in a vocab of 256
  with pytest.raises(ConversionError, match=r"special-token ids .*151644.* outside the vocabulary of 256"):
    bagel_conv.open_release(src)
  with pytest.raises(SystemExit) as e:
    convert_main(["bagel", "--src", src, "--dst", str(tmp_path / "ckpt"), "--quiet"])
  assert e.value.code == 1 and not os.path.exists(tmp_path / "ckpt")
