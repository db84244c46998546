"""The names on the wire: message types, record names and config keys, in one place.

Both ends of a message read these names from here: the ServerApp's transport
(``server.federation.messages`` and ``server.app``) when it builds an instruction and reads a
reply, the ClientApp (``client.app``) when it reads an instruction and builds the reply. A key
changed here changes on both sides at once.

==================  =======================================================================
message_type        config keys -> reply content
==================  =======================================================================
``query.preflight`` ``experiment`` -> ConfigRecord ``"summary"`` = {``json``: SiteSummary JSON}
``train``           ``experiment, shared, server-round, lr, local-epochs, local-steps, proximal-mu``,
                    [``validate``], ``arrays-layout`` + arrays [+ ``control-layout`` + ArrayRecord ``"control"``:
                    SCAFFOLD's correction c - c_i]
                    -> ArrayRecord ``"arrays"`` [+ ``"control"``: the site's new control
                    variate] + ConfigRecord ``"layout"`` (the digests of the layouts they were
                    packed with) + MetricRecord ``"metrics"`` (``num-examples``, ``train-loss``,
                    ``steps``, ``seconds``, ``coord-<task>-{tumour,micro,conflicts}``)
                    [+ ConfigRecord ``"validation"``: the received weights' EvalStats on ``validate``]
                    [+ ConfigRecord ``"trained"`` = {``tensors``: names}: a site lacking a modality
                    lists the weights it trained; absent = all of them]
``evaluate``        ``experiment, shared, server-round, split, arrays-layout`` + arrays
                    -> MetricRecord ``"metrics"`` = ``EvalStats.to_record()``
==================  =======================================================================

Weights travel packed (``smm_model.contract.packing``): an ArrayRecord holds one flat array per
dtype, keyed by the dtype's name, and the config key ``<record>-layout`` holds the names, shapes and
dtypes that take it apart again.
"""

from __future__ import annotations

__all__ = ["PREFLIGHT", "PREFLIGHT_HANDLER", "TRAIN", "EVALUATE", "ARRAYS", "CONTROL", "METRICS", "CONFIG", "SUMMARY",
           "DP_EPSILON", "DP_DELTA", "DP_SIGMA", "DP_CLIP", "DP_SAMPLE_RATE", "SUMMARY_JSON", "KEY_EXPERIMENT", "KEY_SHARED", "KEY_ROUND", "KEY_LR", "KEY_LOCAL_EPOCHS", "KEY_LOCAL_STEPS",
           "KEY_PROXIMAL_MU", "KEY_SPLIT", "KEY_VALIDATE", "VALIDATION", "LAYOUT", "TRAINED", "TRAINED_TENSORS", "layout_key", "NUM_EXAMPLES", "TRAIN_LOSS", "STEPS", "SECONDS"]

# Message types (Flower's MessageType.QUERY is "query"; ".preflight" names our handler).
PREFLIGHT_HANDLER = "preflight"
PREFLIGHT = f"query.{PREFLIGHT_HANDLER}"
TRAIN = "train"
EVALUATE = "evaluate"

# Record names in a message's RecordDict.
ARRAYS = "arrays"
CONTROL = "control"  # SCAFFOLD: the site's correction c - c_i (train) / the site's new c_i (reply)
METRICS = "metrics"
CONFIG = "config"
SUMMARY = "summary"
SUMMARY_JSON = "json"
LAYOUT = "layout"  # a train reply's ConfigRecord: {record name: digest of the layout it was packed with}
#: A train reply's ConfigRecord when the message asked for KEY_VALIDATE: ``EvalStats.to_record()`` of
#: the weights as received, on that split, computed before training (one message phase per round).
VALIDATION = "validation"

#: A train reply's ConfigRecord from a site lacking a modality: {TRAINED_TENSORS: the names of the
#: weights it trained} (site-level: from its declared modalities and the architecture). The server
#: averages each weight over the sites that trained it; without the record a site trained them all.
TRAINED = "trained"
TRAINED_TENSORS = "tensors"

# Keys of the "config" ConfigRecord the server sends.
KEY_EXPERIMENT = "experiment"  # resolved config YAML: smm_model.contract.protocol.config_text(cfg)
KEY_SHARED = "shared"  # SharedStats.to_json()
KEY_ROUND = "server-round"
KEY_LR = "lr"
KEY_LOCAL_EPOCHS = "local-epochs"
KEY_LOCAL_STEPS = "local-steps"  # optimizer steps per round (0: local-epochs passes instead)
KEY_PROXIMAL_MU = "proximal-mu"
KEY_SPLIT = "split"  # "val" | "test"
KEY_VALIDATE = "validate"  # train: first evaluate the received weights on this split ("val"), reply VALIDATION


def layout_key(record: str) -> str:
    """The config key holding the packing layout of ArrayRecord ``record`` (``arrays-layout``)."""
    return f"{record}-layout"

# Keys of a train reply's "metrics" MetricRecord.
#: The weighting key of every train reply (Flower's ``weighted_by_key``).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
STEPS = "steps"
SECONDS = "seconds"  # the site's wall time for the message: validation (when asked) + training
#: DP-SGD at the site (privacy.dp): the site's cumulative epsilon at DP_DELTA after this round, the
#: noise multiplier, the per-patient clipping norm and the Poisson sample rate of the round.
DP_EPSILON = "dp-epsilon"
DP_DELTA = "dp-delta"
DP_SIGMA = "dp-sigma"
DP_CLIP = "dp-clip"
DP_SAMPLE_RATE = "dp-sample-rate"
