"""Evaluation of trained models (``task=eval``): one evaluator per ``conf/eval/<name>.yaml``.

An evaluator is a class whose constructor takes its config's keys and whose call takes the
``EvalContext`` (model, data, ranks) and returns an ``EvalResult``. A new one is a module here
plus a config file; the pipeline (``seit.pipelines.eval``) does not change.
"""
