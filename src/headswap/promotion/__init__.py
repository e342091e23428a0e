"""Champion/challenger promotion: the operations on the model registry after the register stage.

- ``scoring``: re-score a registered ONNX version on the workspace's test split (never trusting
  the numbers recorded at registration), after checking it against its ``onnx_sha256`` tag.
- ``score_cache``: each model's scores per image, keyed by the model's and the image's bytes,
  in the feature-cache folder, so each image is scored once per model.
- ``statistics``: the gate's pure statistics and tolerance rules over two scored versions
  (McNemar's exact test, paired bootstrap intervals); no MLflow.
- ``fairness``: whether today's test split is fair to both versions (split settings, images a
  version learned from, labels, class lists).
- ``lock``: the promotion lock, kept in MLflow itself so it holds across machines.
- ``audit``: the audit history of every decision, and champion moves made outside headswap.
- ``promote``: promote (gate, then move ``@champion``), roll back, and the first champion.

All of it talks to the store through ``headswap.tracking``.
"""
