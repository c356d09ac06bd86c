"""Parameters on the real model: facts passed as arguments are answered from the cached prompt as
well as from the full prefill, because a parameter's slot is encoded with plain text (SmolLM2's
unk token is <|endoftext|>, a document separator, which made the text after a slot a new document).
The data are those of `benchmarks/params_real.py`."""

from __future__ import annotations

from benchmarks import params_real

N = 8


def test_parameter_slots_are_encoded_with_plain_text(engine, smollm2):
    layout = engine.add_schema(params_real.schema_xml())
    special = set(smollm2.tokenizer.all_special_ids)
    slots = [s for m in layout.modules.values() for s in m.slots.values()]
    assert len(slots) == len(params_real.FACTS)
    assert all(not special.intersection(s.filler) for s in slots)


def test_facts_passed_as_arguments_are_answered_from_the_cache(engine):
    engine.add_schema(params_real.schema_xml())
    values = params_real.VALUES[0]
    full = cached = 0
    for (_, _, question), expected in zip(params_real.FACTS, values):
        prompt = params_real.prompt_xml(values, question)
        full += expected.lower() in engine.generate(prompt, max_new_tokens=N, enable_cache=False).text.lower()
        cached += expected.lower() in engine.generate(prompt, max_new_tokens=N).text.lower()
    assert full >= len(values) // 2, "the model should know most facts given in its prompt"
    assert cached >= full - 1
