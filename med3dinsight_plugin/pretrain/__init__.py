"""Med3DInsight pretraining: configuration, data, the training engine (single process or torchrun DDP), diagnostics.

From a configuration (what ``med3dinsight pretrain`` does)::

    from med3dinsight_plugin.pretrain import load_config, run_pretraining

    config = load_config("run.yaml", ["data.source=/data/Dataset042", "data.cache=cache", "output=runs/a"])
    result = run_pretraining(config)  # a PretrainResult
    print(result.checkpoint, result.eval)

With your own datasets (map-style, ``dataset[i]`` deterministic for any sample number ``i``)::

    from med3dinsight_plugin.pretrain import build_model, pretrain

    model = build_model(config, embed_dim=512)
    pretrain(config, model, train_set, eval_set, metadata={"teacher": "BiomedCLIP"})
"""
from .config import ConfigError, PretrainConfig, load_config, save_config
from .diagnostics import evaluate, plot_metrics, retrieval_metrics
from .engine import PretrainResult, lr_factor, pretrain
from .factory import build_model
from .run import check_downstream_load, run_pretraining

__all__ = ["ConfigError", "PretrainConfig", "PretrainResult", "build_model", "evaluate", "load_config", "lr_factor",
           "plot_metrics", "pretrain", "retrieval_metrics", "run_pretraining", "save_config", "check_downstream_load"]
