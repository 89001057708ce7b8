"""Every session-state key and query parameter the app reads in more than one place: the only place they are spelled.

Widget keys used by one widget only stay literals next to it. A key that depends on the model shown takes the
workload key (``"zoo:digits-mlp"``, ``"upload:<hash>"``) so each model keeps its own choice.
"""

from __future__ import annotations

from qcore.recipe.links import LAYERS_PARAM, PRESET_PARAM  # noqa: F401 -- ?preset=&layers=, spelled by the engine's URL codec

# ---- the model shown (sidebar) --------------------------------------------------------------------
SOURCE = "model_source"  # "zoo" | "upload"
ZOO, UPLOAD_SOURCE = "zoo", "upload"  # the two values of SOURCE
ZOO_NAME = "model"  # the zoo model chosen in the sidebar; also its URL query parameter (?model=...)
LABEL_COLUMN = "label_column"  # CSV label column typed in the sidebar
UPLOAD = "uploaded"  # {"key", "workload", "label"} of the last upload that loaded
UPLOAD_ERROR = "upload_error"  # one-line message of the last upload that failed
UPLOAD_PARAM = "upload"  # ?upload=<first 16 hex of the upload's content_hash>: a link cannot carry the file itself
LINK_READ = "link_model_read"  # the link's ?model= / ?upload= were read once this session
MODEL_ERROR = "link_model_error"  # one-line message when the link names a model that is not in the zoo
LINK_UPLOAD = "link_upload"  # the ?upload= hash a link asked for, until a file with that hash is loaded

# ---- the recipe the decide pages share (Sensitivity, Mixed precision, Trade-offs, Export) ---------
RECIPES = "recipes"  # {workload key: {"preset": str, "layers": {layer: override | None}}}
URL_RESTORED = "url_recipe_restored"  # the link's recipe was read once this session
URL_ERROR = "url_recipe_error"  # one-line message when the link's recipe could not be used
EDITOR_VERSION = "recipe_editor_version"  # bumped when the recipe changes outside the table editor
SWEEP = "sweep_settings"  # {"key", "candidates", "mode", "view"} of the last sweep the Sensitivity page ran
USER_RECIPES = "user_recipes"  # {workload key: {label: recipe dict}} evaluated, searched or uploaded; see remember
SEARCH = "search_result"  # {workload key: qcore.analysis.search.search result + "label" it is kept under}
MEASURED = "measured_latency"  # {workload key: {recipe id: {"latency_ms", "source"}}} timed by runtime.bench
MEASURING = "measuring_latency"  # the runtime label whose "Measure latency" click is still being timed (jobs)
RECIPE_UPLOAD_DIGEST = "mp_upload_digest"  # sha256 of the recipe JSON the Mixed precision page loaded last
TRADEOFFS_EVALUATED = "tradeoffs_evaluated"  # {(workload key, recipe id)} the Trade-offs page evaluated this session
REPORT = "export_report"  # (repr of what the Export page's report shows, its HTML) of the last report built
QAT_RUNS = "qat_runs"  # {(workload key, recipe id, QATConfig): QATResult} finished on the QAT page this session
JOB_SESSION = "job_session"  # random id of this browser session: who may cancel the jobs it started (ui.jobs)
JOBS = "jobs"  # {job kind: key of the job this session last asked for}
JOB_PARAM = "job"  # ?job=<key> while a job of this page runs, so a reload finds it
MEASURED_RECIPE = "mp_measured"  # {"recipe": JSON, "result": Workload.evaluate} of the last "Evaluate" click
REMEDY = "remedy_results"  # {(workload key, layer, remedy, recipe JSON): remedies.try_remedy result} tried this session

# ---- the Generation page (language models) --------------------------------------------------------
GEN_PROMPT, GEN_TOKENS, GEN_MODE = "gen_prompt", "gen_tokens", "gen_mode"  # prompt text, new tokens, greedy|sampling
GEN_SEED, GEN_TEMPERATURE = "gen_seed", "gen_temperature"  # sampling's seed and temperature


# ---- widget keys another page sets (Sensitivity opens a layer on Weights / Activations) -----------
def weights_layer(key: str) -> str:
    """The Weights page's layer select box for workload ``key``."""
    return f"weights_layer:{key}"


def activations_layer(key: str) -> str:
    """The Activations page's layer select box for workload ``key``."""
    return f"act_layer:{key}"


def exported(fmt: str, key: str) -> str:
    """The Export page's last ``fmt`` export (``"onnx"``, ``"safetensors"``) of workload ``key``."""
    return f"export_{fmt}:{key}"
