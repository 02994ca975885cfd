"""Evaluation task types. Each module is plain functions with the same names:

    check_record(record, where, spec)   raise ValueError("FILE:LINE: ...") for a bad record
    check_spec(spec, where)             (optional) validate the task type's own keys in the task file
    template_fields(record, spec)       the {placeholders} a prompt template may use
    default_templates(spec)             prompt templates when the task file lists none
    gold_answer(record, spec)           the answer shown in few-shot demonstrations
    run(ctx, spec, template, split, desc) -> (metrics, predictions)
    PRIMARY, HIGHER_IS_BETTER           the metric that picks a template on dev data, and directions

metrics maps a name to a number (or None), or to {"value": number, "n": examples, "signature": ...}
when it needs more than the number; predictions is one JSON-able dict per example.
"""
from minillm.tasks import gec, multiple_choice, perplexity, qa, safety, translation

TASK_TYPES = {
    "perplexity": perplexity,
    "multiple_choice": multiple_choice,
    "qa": qa,
    "translation": translation,
    "gec": gec,
    "safety": safety,
}
