"""The attentive-probe protocol (AIM paper, downstream evaluation) in small parts.

data.py      labelled inputs: ImageFolder trees, split folders, list files; the held-out split; label files
features.py  the frozen trunk: probe-layer averages (B, N, D) and their token means for k-NN; the feature cache
train.py     ProbeConfig, warmup + cosine schedule, head training on cached features or through the trunk
metrics.py   top-k, confusion summary, k-NN, Spearman
export.py    the head in the released `head.*` layout via aimcore, and the aimcore.load_model round trip
runner.py    run_probe(): everything above for one trunk, as probe.py, baselines.py and evidence.py use it
"""
