"""Hostile PML: entity tricks, DTDs, XInclude, oversized or deep input, escaping src= paths.

Every one must end in a `SchemaError` (never a raw lxml exception), and no message may carry
the content of a file the document points at.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from promptcache.errors import SchemaError
from promptcache.markup import parse, xmlsafe
from promptcache.markup.parse import parse_prompt, parse_schema

CANARY = "TOP-SECRET-CANARY-1234"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(CANARY + "\n", encoding="utf-8")
    return path


def refused(fn, source, **kwargs) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        fn(source, **kwargs)
    assert CANARY not in str(info.value) and "root:x:0:0" not in str(info.value)
    return info.value


# ---- DTDs and entities -----------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
  <!ENTITY lol "lol">
""" + "".join(f'  <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">\n'
              for i in range(1, 10)) + """]>
<schema name="bomb"><module name="m">&lol9;</module></schema>"""


def test_billion_laughs_is_refused_fast():
    start = time.perf_counter()
    error = refused(parse_schema, BILLION_LAUGHS)
    assert time.perf_counter() - start < 1.0
    assert "DOCTYPE" in error.message and error.line == 2


@pytest.mark.parametrize("fn, root", [(parse_schema, '<schema name="t">&x;</schema>'),
                                      (parse_prompt, '<prompt schema="t">&x;</prompt>')])
@pytest.mark.parametrize("target", ["file:///etc/passwd", "SECRET", "http://127.0.0.1:9/x"])
def test_external_entities_are_refused(fn, root, target, secret):
    target = secret.as_uri() if target == "SECRET" else target
    doc = f'<?xml version="1.0"?>\n<!-- c -->\n<!DOCTYPE x [<!ENTITY x SYSTEM "{target}">]>\n{root}'
    error = refused(fn, doc)
    assert "DOCTYPE" in error.message and error.line == 3


def test_plain_doctype_is_refused(tmp_path):
    path = tmp_path / "s.xml"
    path.write_text('<!DOCTYPE schema SYSTEM "pml.dtd">\n<schema name="t"/>', encoding="utf-8")
    assert refused(parse_schema, path).source == str(path)


def test_doctype_text_inside_cdata_is_just_text():
    xml = '<schema name="t"><module name="html"><![CDATA[<!DOCTYPE html><html></html>]]></module></schema>'
    assert parse_schema(xml).children[0].children[0].text == "<!DOCTYPE html><html></html>"


def test_undeclared_entity_is_malformed():
    error = refused(parse_schema, '<schema name="t">\n  &passwd;</schema>')
    assert "malformed XML" in error.message and error.line == 2 and error.column is not None


# ---- XInclude and namespaces -----------------------------------------------------------------

@pytest.mark.parametrize("fn, root", [(parse_schema, 'schema name="t"'), (parse_prompt, 'prompt schema="t"')])
def test_xinclude_is_not_processed(fn, root, secret):
    tag = root.split()[0]
    doc = (f'<{root} xmlns:xi="http://www.w3.org/2001/XInclude">\n'
           f'<xi:include href="{secret.as_uri()}" parse="text"/></{tag}>')
    error = refused(fn, doc)
    assert "xi:include" in error.message and error.line == 2


def test_xinclude_inside_module(secret):
    doc = (f'<schema name="t"><module name="m" xmlns:xi="http://www.w3.org/2001/XInclude">\n'
           f'<xi:include href="{secret}" parse="text"/></module></schema>')
    assert "never processed" in refused(parse_schema, doc).message


# ---- size and depth --------------------------------------------------------------------------

def test_oversized_string_is_refused_before_parsing(monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("parsed an oversized document")

    monkeypatch.setattr(xmlsafe.etree, "fromstring", no_parse)
    doc = '<schema name="t">' + "x" * 2000 + "</schema>"
    assert "max_bytes=1024" in refused(parse_schema, doc, max_bytes=1024).message
    assert "max_bytes" in refused(parse_prompt, '<prompt schema="t">' + "é" * 600 + "</prompt>",
                                  max_bytes=1024).message


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.xml"
    path.write_text('<schema name="t">' + "x" * 5000 + "</schema>", encoding="utf-8")
    monkeypatch.setattr(xmlsafe.etree, "fromstring", lambda *a, **k: pytest.fail("parsed"))
    error = refused(parse_schema, path, max_bytes=4096)
    assert "over the limit of 4096" in error.message


def nested(depth: int, root: str = 'schema name="t"', tag: str = "module") -> str:
    opening = "".join(f'<{tag} name="m{i}">' if tag == "module" else f"<{tag}>" for i in range(depth - 1))
    return f"<{root}>{opening}{f'</{tag}>' * (depth - 1)}</{root.split()[0]}>"


def test_depth_limit_boundary():
    assert parse_schema(nested(xmlsafe.MAX_DEPTH))
    error = refused(parse_schema, nested(xmlsafe.MAX_DEPTH + 1))
    assert f"more than {xmlsafe.MAX_DEPTH} levels" in error.message
    assert refused(parse_prompt, nested(xmlsafe.MAX_DEPTH + 1, 'prompt schema="t"', "a")).line == 1


def test_very_deep_nesting_is_a_schema_error():
    assert "malformed XML" in refused(parse_schema, nested(5000)).message


# ---- src= files ------------------------------------------------------------------------------

def src_schema(src: str) -> str:
    return f'<schema name="t">\n<module name="m" src="{src}"/></schema>'


@pytest.fixture
def base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "sub" / "ok.txt").write_text("fine", encoding="utf-8")
    return base


def test_src_inside_base_including_absolute(base):
    for src in ("sub/ok.txt", "./sub/../sub/ok.txt", str(base / "sub" / "ok.txt")):
        assert parse_schema(src_schema(src), base_dir=base).children[0].children[0].text == "fine"


@pytest.mark.parametrize("src", ["../secret.txt", "sub/../../secret.txt", "SECRET_ABS", "/etc/passwd"])
def test_src_outside_base_is_refused(base, secret, src):
    src = str(secret) if src == "SECRET_ABS" else src
    error = refused(parse_schema, src_schema(src), base_dir=base)
    assert "outside the allowed directory" in error.message and error.line == 2


def test_src_symlink_escaping_base_is_refused(base, secret):
    (base / "link.txt").symlink_to(secret)
    (base / "dirlink").symlink_to(secret.parent, target_is_directory=True)
    for src in ("link.txt", "dirlink/secret.txt"):
        assert "outside" in refused(parse_schema, src_schema(src), base_dir=base).message


def test_src_symlink_inside_base_is_followed(base):
    (base / "alias.txt").symlink_to(base / "sub" / "ok.txt")
    assert parse_schema(src_schema("alias.txt"), base_dir=base).children[0].children[0].text == "fine"


def test_src_missing_names_the_src(base):
    error = refused(parse_schema, src_schema("sub/nope.py"), base_dir=base)
    assert "'sub/nope.py'" in error.message and "module 'm'" in error.message


def test_src_too_big(base, monkeypatch):
    (base / "big.txt").write_text(CANARY * 10, encoding="utf-8")
    monkeypatch.setattr(parse, "SRC_MAX_BYTES", 64)
    assert "over the limit of 64" in refused(parse_schema, src_schema("big.txt"), base_dir=base).message


def test_src_not_utf8(base):
    (base / "latin1.txt").write_bytes(CANARY.encode() + b" caf\xe9")
    error = refused(parse_schema, src_schema("latin1.txt"), base_dir=base)
    assert "not valid UTF-8" in error.message and "\\xe9" not in error.message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_src_fifo_and_directory_are_not_read(base):
    os.mkfifo(base / "pipe")
    os.mkdir(base / "adir")
    for src in ("pipe", "adir"):
        error = refused(parse_schema, src_schema(src), base_dir=base)
        assert "not a regular file" in error.message or "cannot read" in error.message


# ---- characters ------------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["if a < b: x", "a<b", "a <= b", "x && y", "tom&jerry", "a<b and c>d", "&nbsp;"])
def test_bare_markup_characters_in_text_get_a_cdata_hint(body):
    error = refused(parse_schema, f'<schema name="t"><module name="m">\n{body}</module></schema>')
    assert error.message.startswith("malformed XML") and error.line == 2
    assert "use <![CDATA[...]]> or &lt; / &amp;" in error.message


def test_other_syntax_errors_get_no_cdata_hint():
    error = refused(parse_schema, '<schema name="t"><module name="m">a ]]> b</module></schema>')
    assert "CDATA[...]" not in error.message


def test_lone_surrogates_are_refused_where_they_are():
    error = refused(parse_schema, '<schema name="t">\n  x\ud83d</schema>')
    assert "lone surrogate U+D83D" in error.message and (error.line, error.column) == (2, 4)
    assert "lone surrogate U+DFFF" in refused(parse_prompt, '<prompt schema="t"><user>\udfff</user></prompt>').message


# ---- anything else still ends as a SchemaError -----------------------------------------------

@pytest.mark.parametrize("doc", [
    "<", "<schema", '<schema name="t"><', '<schema name="t">\x01</schema>', "<schema name='t'>]]></schema>",
    '<schema name="t"/><schema name="u"/>',
    '<schema name="t" name="u"/>', "<schema name='t'><module name='a'></schema>", "<!-- only a comment -->",
    '<schema name="t"><?xml-stylesheet href="x.xsl"?></schema',
])
def test_garbage_raises_schema_error_only(doc):
    for fn in (parse_schema, parse_prompt):
        refused(fn, doc)


def test_bad_files(tmp_path):
    assert "cannot read" in refused(parse_schema, tmp_path / "missing.xml").message
    (tmp_path / "bin.xml").write_bytes(b'<schema name="t">\xff\xfe</schema>')
    assert "not valid UTF-8" in refused(parse_schema, tmp_path / "bin.xml").message
    (tmp_path / "empty.xml").write_bytes(b"")
    refused(parse_schema, tmp_path / "empty.xml")
    refused(parse_prompt, tmp_path)  # a directory


@pytest.mark.parametrize("encoding", ["ISO-8859-1", "UTF-16", "bogus"])
def test_declared_encoding_is_overridden_by_utf8(encoding, tmp_path):
    doc = f'<?xml version="1.0" encoding="{encoding}"?><schema name="café"/>'
    assert parse_schema(doc).name == "café"
    (tmp_path / "s.xml").write_text(doc, encoding="utf-8")
    assert parse_schema(tmp_path / "s.xml").name == "café"


def test_src_files_count_against_the_schema_size_limit(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 300)  # 1,500 bytes, read once per mention
    mods = "".join(f'<module name="m{i}" src="big.txt"/>' for i in range(3))
    doc = f'<schema name="s">{mods}</schema>'
    parse.parse_schema(doc, base_dir=tmp_path, max_bytes=5000)  # 3 x 1,500 + the document fit
    with pytest.raises(SchemaError, match="max_bytes=4000"):
        parse.parse_schema(doc, base_dir=tmp_path, max_bytes=4000)
