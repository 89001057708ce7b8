"""AppTest: an uploaded Hugging Face language model shows the memory calculator on the Model page, and a bad
zip upload is one error line while the model loaded before stays loaded."""

import io
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import hf_models
from qcore.io.workload import load_workload
from ui import keys
from ui.text import plain

APP = str(Path(__file__).resolve().parents[2] / "app.py")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = hf_models.save("gpt2", tmp_path_factory.mktemp("hf") / "gpt2")
    return load_workload(str(folder), str(folder / "text.txt"))


def test_model_page_shows_weights_and_kv_cache_memory_for_a_language_model(gpt2):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state[keys.SOURCE] = keys.UPLOAD_SOURCE
    at.session_state[keys.UPLOAD] = {"key": f"upload:{gpt2.content_hash}", "workload": gpt2, "label": "gpt2.zip"}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Memory: weights and KV cache" in [s.value for s in at.subheader]
    table = at.dataframe[-1].value
    big = table[(table["model"] == "Llama-2-70B") & (table["format"] == "fp16")].iloc[0]
    assert round(big["weights (GB)"], 1) == 138.0 and round(big["KV cache (GB)"], 3) == 1.342  # 4096 tokens, fp16
    own = table[(table["model"] == gpt2.name) & (table["format"] == "fp32")].iloc[0]
    # the tiny GPT-2: its parameters x 4 bytes; KV: 2 x 2 layers x 4 heads x 8 x 64 tokens (its context) x 2 bytes
    assert own["weights (GB)"] * 1e9 == pytest.approx(4 * sum(p.numel() for p in gpt2.model.parameters()))
    assert own["KV cache (GB)"] * 1e9 == 2 * 2 * 4 * 8 * 64 * 2
    assert any("not a measurement" in plain(c.value) for c in at.caption)


def _upload(name: str, data: bytes):
    """A script that loads one uploaded file through the sidebar's loader, over a model loaded before."""
    def script():
        import streamlit as st

        from ui import frame, keys

        class Uploaded:
            name, data = st.session_state["upload_name"], st.session_state["upload_bytes"]

            def getvalue(self):
                return self.data

        st.session_state.setdefault(keys.UPLOAD, "the model loaded before")
        frame.load_upload(Uploaded(), None, "")

    at = AppTest.from_function(script, default_timeout=120)
    at.session_state["upload_name"], at.session_state["upload_bytes"] = name, data
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_zip_with_a_path_out_of_its_folder_is_one_error_and_nothing_is_lost():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../config.json", "{}")
    at = _upload("evil.zip", buf.getvalue())
    message = at.session_state[keys.UPLOAD_ERROR]
    assert "'..'" in message and "\n" not in message
    assert at.session_state[keys.UPLOAD] == "the model loaded before"


def test_the_kv_cache_choice_is_part_of_the_recipe_and_of_the_link(gpt2):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state[keys.SOURCE] = keys.UPLOAD_SOURCE
    at.session_state[keys.UPLOAD] = {"key": f"upload:{gpt2.content_hash}", "workload": gpt2, "label": "gpt2.zip"}
    at.query_params.update(preset="int8-dynamic", kv="int4.per_head")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    entry = at.session_state[keys.RECIPES][f"upload:{gpt2.content_hash}"]
    assert entry == {"preset": "int8-dynamic", "layers": {}, "kv": "int4.per_head"}
    (box,) = [b for b in at.sidebar.selectbox if b.label == "KV cache"]
    assert box.value == "int4.per_head"
    box.select("int8.per_token").run()
    assert at.query_params["kv"] == "int8.per_token" and at.query_params["preset"] == "int8-dynamic"
