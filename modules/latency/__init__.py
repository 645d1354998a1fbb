"""Block-wise latency predictor measured on the device the user deploys to (nn-Meter's role in the original).

The latency of every distinct block configuration (block type, input size, cin, cout, kernel, expand,
stride, activation, SE; `keys.block_key`) is *measured* on the device as a standalone model at batch 1 and
cached in a JSON table ``<table_dir>/<platform>.json``, saved atomically after every batch of blocks, so an
interrupted build (or a phone that disconnects) resumes where it stopped. A subnet's latency is the sum of
its blocks with a whole-model correction fitted on whole subnets measured end to end::

    predicted = a * sum_i block_i + b          (block_i: table entry, or the regression fallback)

What a block measured alone pays that it does not pay inside a network, and how it is removed:

* **session-call overhead**: measured once per table on a trivial model (``overhead_ms``) and subtracted
  from every raw block time; the whole model pays it once (in ``b``). ORT blocks run with IO binding;
* **Q/DQ and layout changes at the block boundary** (INT8): inside a network the tensor between two blocks
  stays uint8 and NHWC; the standalone block's input QuantizeLinear and output DequantizeLinear are cut and
  its I/O made NHWC (`quantize.strip_boundary_qdq`, `quantize.nhwc_boundaries`), except the image input of
  ``FirstConv`` and the logits output of ``Logits``, which the whole network pays too;
* what remains (cold caches for each block's weights, scheduling) is fitted by the correction.

One file per concern:

========================  ==========================================================================
``keys.py``               platforms, block keys
``graph.py``              ONNX graphs of blocks / subnets written directly, analytic block features
``quantize.py``           INT8 graph surgery (static quantization, boundary Q/DQ, NHWC I/O, stitching)
``models.py``             the model files a runner times (blocks, whole subnets, the overhead model)
``sessions.py``           the one ONNX Runtime / LiteRT session factory (also for benchmarks, deployment)
``timing.py``             warm-up, rounds, statistics (:class:`timing.MeasureConfig`)
``local.py``              the local runner (this process, this machine)
``remote.py``             device runners: a phone over adb (LiteRT ``benchmark_model``), a host over ssh (ORT)
``remote_timer.py``       the timing command run on an ssh host (needs only numpy + onnxruntime there)
``csv_import.py``         block timings measured elsewhere, from a CSV
``sampling.py``           subnet block configurations from encodings, random supernets / subnets
``regression.py``         the fallback for blocks not in the table (NNLS + a flat random forest)
``predictor.py``          :class:`predictor.LatencyPredictor`, :func:`predictor.load_predictor`
========================  ==========================================================================

Platforms: ``ort_int8``, ``ort_fp32``, ``tflite_int8``, ``tflite_fp32`` (measured), ``macs`` (MMACs / 100:
a proxy for tests, not a latency).

Example::

    from modules.latency.predictor import load_predictor
    pred = load_predictor("ort_int8", "tiny", "checkpoints/latency")   # built by build_latency_table.py
    ms = pred.predict_subnet(net)           # net: a SuperNet with an active subnet, or a standalone subnet
    ms = pred.predict_config("tiny-123450-000000", "d1#1#..._r48")      # from encodings, no network
"""
