"""Rule loading: published YAML as is, problems with file:line:col, attribution and the rmmhunt block."""

from __future__ import annotations

from pathlib import Path

import pytest
from rules_refdata import JISCHELL_DIR, NOW, SENTINEL_DIR, cert_row, require_reference

from agent.rules.loader import RuleProblem, check_rule_file, load_rules, parse_rule, tool_from_name

GOOD = """\
id: 11111111-1111-1111-1111-111111111111
name: Remote Management and Monitoring tool - Example - File Signature
description: |
    An example.
requiredDataConnectors:
- connectorId: MicrosoftThreatProtection
  dataTypes:
  - DeviceFileCertificateInfo
tactics: CommandAndControl
relevantTechniques: T1219
query: |
  let Time_start = now(-5d);
  let Time_end = now();
  //
  DeviceFileCertificateInfo
  | where Timestamp between (Time_start..Time_end)
  | where Signer has 'Example Corp'
  | summarize FirstSeen=min(Timestamp), LastSeen=max(Timestamp),
      Report=make_set(ReportId), Count=count() by DeviceId, DeviceName
"""


def rule_text(*, rule_id: str = "11111111-1111-1111-1111-111111111111", query_line: str | None = None) -> str:
    text = GOOD.replace("11111111-1111-1111-1111-111111111111", rule_id)
    if query_line is not None:
        text = text.replace("  | where Signer has 'Example Corp'", query_line)
    return text


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def only_problem(text: str) -> RuleProblem:
    rule, problems = parse_rule(text, "rule.yaml")
    assert rule is None
    [problem] = problems
    return problem


# --- the published rules -----------------------------------------------------------------------------


def test_all_published_rules_load() -> None:
    require_reference()
    ruleset = load_rules([SENTINEL_DIR])
    assert ruleset.problems == ()
    assert len(ruleset.rules) == 51
    assert len({rule.id for rule in ruleset.rules}) == 51
    for rule in ruleset.rules:
        assert rule.source == "published"
        assert rule.tactics == ("CommandAndControl",)
        assert rule.techniques == ("T1219",)
        assert rule.meta == {}
        assert rule.shared_with == ()
        assert rule.description.startswith("Remote Monitoring and Management")
        assert Path(rule.path).parent == SENTINEL_DIR
        assert Path(rule.path).name == f"rmm_{rule.tool}_filesig.yaml", "tool comes from the name"


def test_tool_from_name_including_the_action1_typo() -> None:
    require_reference()
    by_tool = {rule.tool: rule for rule in load_rules([SENTINEL_DIR]).rules}
    assert by_tool["Action1"].name == "Remote Management and Montioring tool - Action1 - File Signature"
    assert by_tool["parsec.app"].query.filter_row(cert_row("Parsec Cloud, Inc."), now=NOW) is not None
    assert tool_from_name("Remote Management and Monitoring tool - MSP360_CloudBerry - File Signature") == (
        "MSP360_CloudBerry"
    )
    assert tool_from_name("Remote Management and Montioring tool - Action1 - File Signature") == "Action1"
    assert tool_from_name("  Something else entirely ") == "Something else entirely"


def test_jischell_copies_are_invalid_yaml_and_say_where() -> None:
    require_reference()
    ruleset = load_rules([JISCHELL_DIR])
    assert ruleset.rules == ()
    assert len(ruleset.problems) == 52
    for problem in ruleset.problems:
        assert problem.message.startswith("invalid YAML: ")
        lines = Path(problem.path).read_text(encoding="utf-8").split("\n")
        # the mis-indented `dataTypes:` under the `- connectorId` list item
        assert lines[problem.line - 1].strip() == "dataTypes:", str(problem)
        assert problem.column == 5
        assert str(problem) == f"{problem.path}:{problem.line}:5: {problem.message}"


# --- problems ------------------------------------------------------------------------------------------


def test_bad_file_is_a_problem_and_the_others_still_load(tmp_path: Path) -> None:
    write(tmp_path, "a_good.yaml", rule_text(rule_id="a"))
    bad = write(tmp_path, "b_bad.yaml", "id: b\nname: B\n  bad: indent\nquery: DeviceFileCertificateInfo\n")
    write(tmp_path, "c_good.yml", rule_text(rule_id="c"))
    write(tmp_path, "notes.txt", "not a rule")
    ruleset = load_rules([tmp_path])
    assert [rule.id for rule in ruleset.rules] == ["a", "c"]
    [problem] = ruleset.problems
    assert problem.path == str(bad)
    assert problem.message.startswith("invalid YAML")
    assert (problem.line, problem.column) == (3, 6)
    assert str(problem) == f"{bad}:3:6: invalid YAML: mapping values are not allowed in this context"


@pytest.mark.parametrize(
    ("query_line", "line", "column", "fragment"),
    [
        ("  | join (Other) on DeviceId", 17, 5, "unsupported operator 'join'"),
        ("  | sample 10", 17, 5, "unsupported operator 'sample'"),
        ("  | where Foo has 'x'", 17, 11, "unknown column 'Foo'"),
        ("  | where Signer has 'unterminated", 17, 22, "unterminated string literal"),
        ("      | where Signer has 'x' and foo(Signer)", 17, 34, "unsupported function 'foo'"),
    ],
)
def test_kql_errors_are_mapped_to_the_file_position(query_line: str, line: int, column: int, fragment: str) -> None:
    text = rule_text(query_line=query_line)
    problem = only_problem(text)
    assert fragment in problem.message
    assert (problem.line, problem.column) == (line, column)
    # the position really is where the construct starts in the file
    word = fragment.split("'")[1] if "'" in fragment else "'"
    assert text.split("\n")[line - 1][column - 1 :].startswith(word)


def test_kql_error_in_a_summarize_continuation_line() -> None:
    text = GOOD.replace("Count=count() by", "Count=avg(ReportId) by")
    problem = only_problem(text)
    assert "unsupported aggregate function 'avg'" in problem.message
    assert (problem.line, problem.column) == (19, 40)
    assert text.split("\n")[18][39:].startswith("avg(")


@pytest.mark.parametrize(
    ("query_yaml", "line", "column", "suffix"),
    [
        ("query: DeviceFileCertificateInfo | sample 1\n", 3, 36, ""),
        ("query: 'DeviceFileCertificateInfo | sample 1'\n", 3, 37, ""),
        ('query: "DeviceFileCertificateInfo | sample 1"\n', 3, 37, ""),
        ("query: >\n  DeviceFileCertificateInfo\n  | sample 1\n", 3, 8, " (query line 1, column 29)"),
    ],
)
def test_kql_errors_in_other_scalar_styles(query_yaml: str, line: int, column: int, suffix: str) -> None:
    problem = only_problem("id: x\nname: X\n" + query_yaml)
    assert problem.message == "unsupported operator 'sample'" + suffix
    assert (problem.line, problem.column) == (line, column)


def test_crlf_and_bom_files_map_positions(tmp_path: Path) -> None:
    text = "\ufeff" + rule_text(query_line="  | sample 10").replace("\n", "\r\n")
    path = write(tmp_path, "crlf.yaml", text.encode("utf-8"))
    [problem] = check_rule_file(path)
    assert (problem.line, problem.column, problem.message) == (17, 5, "unsupported operator 'sample'")
    assert check_rule_file(write(tmp_path, "ok.yaml", ("\ufeff" + GOOD.replace("\n", "\r\n")).encode("utf-8"))) == []


def test_non_utf8_bytes_are_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "latin1.yaml", rule_text(query_line="  | where Signer has 'Krämer'").encode("latin-1"))
    [problem] = check_rule_file(path)
    assert problem.message == "file is not valid UTF-8 (byte 0xe4)"
    assert (problem.line, problem.column) == (17, 25)


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("name: X\nquery: DeviceFileCertificateInfo\n", 1, 1, "missing required key 'id'"),
        ("id: x\nquery: DeviceFileCertificateInfo\n", 1, 1, "missing required key 'name'"),
        ("id: x\nname: X\n", 1, 1, "missing required key 'query'"),
        ("id: x\nname: X\nquery: ''\n", 3, 8, "'query' must be a non-empty string"),
        ("id: [x]\nname: X\nquery: DeviceFileCertificateInfo\n", 1, 5, "'id' must be a non-empty string"),
        ("id: x\nname: X\nquery: DeviceFileCertificateInfo\ntactics: {a: 1}\n", 4, 10, "'tactics' must be"),
        ("id: x\nname: X\nquery: DeviceFileCertificateInfo\ndescription: [1]\n", 4, 14, "'description' must be"),
        ("id: x\nname: X\nid: y\nquery: DeviceFileCertificateInfo\n", 3, 1, "duplicate key 'id'"),
        ("- id: x\n", 1, 1, "a rule file must be a YAML mapping"),
        ("", 1, 1, "a rule file must be a YAML mapping"),
        ('id: x\nname: X\nquery: "a\x01"\n', 3, 10, "invalid YAML: unacceptable character U+0001"),
        ("id: x\n\tname: X\n", 2, 1, "invalid YAML"),
        ("id: x\n---\nname: X\n", 2, 1, "invalid YAML"),
        ("id: x\nname: X\nquery: DeviceFileCertificateInfo\nrmmhunt: [1]\n", 4, 10, "'rmmhunt' must be a mapping"),
        (
            "id: x\nname: X\nquery: DeviceFileCertificateInfo\nrmmhunt:\n  source: other\n",
            5,
            11,
            "'rmmhunt.source' must be 'rmmhunt' or 'published'",
        ),
        ("id: x\nname: X\nquery: DeviceFileCertificateInfo\nrmmhunt:\n  tool: 3\n", 5, 9, "'rmmhunt.tool'"),
        (
            "id: x\nname: X\nquery: DeviceFileCertificateInfo\nrmmhunt:\n  shared_with: {a: b}\n",
            5,
            16,
            "'rmmhunt.shared_with' must be",
        ),
    ],
)
def test_file_problems(text: str, line: int, column: int, message: str) -> None:
    problem = only_problem(text)
    assert message in problem.message
    assert (problem.line, problem.column) == (line, column), str(problem)


def test_duplicate_rule_id_is_a_problem_on_the_second_file(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", rule_text(rule_id="same"))
    second = write(tmp_path, "b.yaml", rule_text(rule_id="same"))
    ruleset = load_rules([tmp_path])
    assert [rule.path for rule in ruleset.rules] == [str(first)]
    [problem] = ruleset.problems
    assert problem.path == str(second)
    assert (problem.line, problem.column) == (1, 5)
    assert problem.message == f"duplicate rule id 'same' (already in {first})"


def test_directories_load_in_order_and_a_missing_one_is_a_problem(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    write(two, "a.yaml", rule_text(rule_id="two-a"))
    write(one, "z.yml", rule_text(rule_id="one-z"))
    write(one, "b.YAML", rule_text(rule_id="one-b"))
    ruleset = load_rules([one, two, tmp_path / "missing"])
    assert [rule.id for rule in ruleset.rules] == ["one-b", "one-z", "two-a"]
    [problem] = ruleset.problems
    assert (problem.line, problem.column) == (0, 0)
    assert str(problem) == f"{tmp_path / 'missing'}: rules directory not found"


# --- metadata ------------------------------------------------------------------------------------------


def test_rmmhunt_block_is_read() -> None:
    text = (
        GOOD.replace("tactics: CommandAndControl", "tactics:\n- CommandAndControl\n- Persistence")
        + "rmmhunt:\n  source: rmmhunt\n  tool: DWService\n  shared_with: [DW Service]\n  why: new certificate\n"
    )
    rule, problems = parse_rule(text, "own.yaml")
    assert problems == []
    assert rule is not None
    assert (rule.source, rule.tool, rule.shared_with) == ("rmmhunt", "DWService", ("DW Service",))
    assert rule.meta == {
        "source": "rmmhunt",
        "tool": "DWService",
        "shared_with": ["DW Service"],
        "why": "new certificate",
    }
    assert rule.tactics == ("CommandAndControl", "Persistence")
    assert rule.path == "own.yaml"
    assert rule.query.filter_row(cert_row("Example Corp"), now=NOW) is not None


def test_rule_without_rmmhunt_block_or_standard_name() -> None:
    rule, problems = parse_rule("id: x\nname: My own hunt\nquery: DeviceFileCertificateInfo\n", "x.yaml")
    assert problems == []
    assert rule is not None
    assert (rule.source, rule.tool, rule.tactics, rule.techniques, rule.description) == (
        "published",
        "My own hunt",
        (),
        (),
        "",
    )
    assert hash(rule)  # usable in sets even with a meta mapping


def test_attribution_overrides_tool_and_sets_shared_with(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    write(rules, "a.yaml", rule_text(rule_id="a"))
    write(rules, "b.yaml", rule_text(rule_id="b") + "rmmhunt:\n  tool: Own\n  shared_with: [X]\n")
    write(rules, "c.yaml", rule_text(rule_id="c"))
    attribution = write(
        tmp_path,
        "rule_attribution.yaml",
        "a:\n  tool: Zoho Assist\n  shared_with: [ManageEngine, Site24x7]\n"
        "b:\n  tool: Renamed\n"
        "unknown-id:\n  tool: Z\n",
    )
    ruleset = load_rules([rules], attribution=attribution)
    assert ruleset.problems == ()
    by_id = {rule.id: rule for rule in ruleset.rules}
    assert (by_id["a"].tool, by_id["a"].shared_with) == ("Zoho Assist", ("ManageEngine", "Site24x7"))
    assert (by_id["b"].tool, by_id["b"].shared_with) == ("Renamed", ("X",))
    assert (by_id["c"].tool, by_id["c"].shared_with) == ("Example", ())


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a: [1]\n", 1, "must be a mapping"),
        ("a:\n  tool: ''\n", 2, "'tool' for 'a' must be a non-empty string"),
        ("a:\n  shared_with: 3\n", 2, "'shared_with' for 'a' must be a list of strings"),
        ("a:\n  colour: red\n", 2, "unknown attribution key(s)"),
        ("- a\n", 1, "an attribution file must map rule ids"),
        ("a: [\n", 2, "invalid YAML"),
    ],
)
def test_bad_attribution_is_a_problem_and_rules_still_load(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    write(rules, "a.yaml", rule_text(rule_id="a"))
    attribution = write(tmp_path, "attr.yaml", text)
    ruleset = load_rules([rules], attribution=attribution)
    assert [rule.tool for rule in ruleset.rules] == ["Example"]
    [problem] = ruleset.problems
    assert problem.path == str(attribution)
    assert problem.line == line
    assert fragment in problem.message


def test_missing_attribution_file_is_a_problem(tmp_path: Path) -> None:
    ruleset = load_rules([tmp_path], attribution=tmp_path / "nope.yaml")
    [problem] = ruleset.problems
    assert problem.path == str(tmp_path / "nope.yaml")
    assert problem.message.startswith("cannot read file")


def test_check_rule_file(tmp_path: Path) -> None:
    assert check_rule_file(write(tmp_path, "ok.yaml", GOOD)) == []
    [problem] = check_rule_file(write(tmp_path, "bad.yaml", rule_text(query_line="  | sample 1")))
    assert str(problem) == f"{tmp_path / 'bad.yaml'}:17:5: unsupported operator 'sample'"
    [missing] = check_rule_file(tmp_path / "absent.yaml")
    assert missing.message.startswith("cannot read file")


def test_oversized_file_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "huge.yaml", GOOD + "#" * (1 << 20))
    [problem] = check_rule_file(path)
    assert "larger than" in problem.message
