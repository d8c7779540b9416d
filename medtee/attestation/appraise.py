"""Appraisal: is this evidence genuine, bound to this key release, and acceptable under this policy?"""

from __future__ import annotations

from datetime import datetime, timezone

from cryptography import x509

from medtee.attestation.amd import CertCache, chain_checks, key_cert_info, revocation_check, select_key_cert
from medtee.attestation.certs import common_name, parse_each
from medtee.attestation.evidence import Evidence, EvidenceFormatError
from medtee.attestation.freshness import Newest
from medtee.attestation.policy import AttestationPolicy, FieldRule, RecipeRules, Revocation
from medtee.attestation.snp import REPORT_SIZE, ReportFormatError, SnpReport, Tcb, signature_check, structure_checks
from medtee.attestation.verdict import Check, Verdict, check


def _find_key_cert(report: SnpReport, supplied: list[x509.Certificate], policy: AttestationPolicy):
    """The VCEK/VLEK from the evidence, else from the cache (or KDS): the one whose key verifies the report."""
    leaf = select_key_cert(supplied, report.signing_key)
    if leaf is not None:
        return leaf
    cache = CertCache(policy.cert_cache_dir, allow_network=policy.fetch_certificates)
    candidates, _ = parse_each(cache.candidates(report, report.product))  # an unparsable cached file is no candidate
    return next((c for c in candidates if signature_check(report, c.public_key(), "candidate").ok), None)


def snp_authenticity(report: SnpReport, certificates: tuple[bytes, ...], policy: AttestationPolicy,
                     now: datetime) -> tuple[list[Check], x509.Certificate | None]:
    """Structure, AMD chain, TCB/hwID consistency and the report signature, and the VCEK/VLEK used (None when none
    was found); a malformed certificate fails `snp.certificates` and the others are still used."""
    supplied, problems = parse_each(certificates)
    out = [check("snp.certificates", False, "a parsable X.509 certificate", "; ".join(problems))] if problems else []
    leaf = _find_key_cert(report, supplied, policy)
    if leaf is None:
        where = f"the evidence, the cache ({policy.cert_cache_dir or 'none configured'})"
        where += " or AMD KDS" if policy.fetch_certificates else " (KDS fetching off)"
        return out + structure_checks(report, report.product) + [
            check("amd.key_cert", False, f"a {report.signing_key.upper()} from {where}", "none found")], None
    chain, product = chain_checks(report, leaf, [c for c in supplied if c is not leaf], now)
    return out + structure_checks(report, product) + chain + [
        signature_check(report, leaf.public_key(), common_name(leaf))], leaf


def binding_checks(report: SnpReport, expected: bytes | None, policy: AttestationPolicy) -> list[Check]:
    """REPORT_DATA equals what the relying party computed from its nonce, the key and the digests."""
    if expected is not None:
        return [check("binding.report_data", report.report_data == expected, expected.hex(), report.report_data.hex())]
    if policy.require_binding and not policy.authenticity_only:
        return [check("binding.report_data", False, "REPORT_DATA computed by the relying party", "none given")]
    return []


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _csp_id(key_cert: x509.Certificate | None) -> str | None:
    try:
        return key_cert_info(key_cert).csp_id if key_cert is not None else None
    except EvidenceFormatError:  # fails amd.key_cert.extensions already
        return None


def snp_policy_checks(report: SnpReport, product: str | None, policy: AttestationPolicy,
                      key_cert: x509.Certificate | None = None) -> list[Check]:
    """The policy's requirements on the CPU report (and on `key_cert`, the VCEK/VLEK that signed it)."""
    versions = set(policy.report_versions) | ({4} if 3 in policy.report_versions else set())
    out = [
        check("policy.report_version", report.version in versions, f"one of {sorted(versions)}", report.version),
        check("policy.signing_key", report.signing_key in policy.signing_keys, policy.signing_keys, report.signing_key),
        check("policy.debug", policy.allow_debug or not report.debug, "DEBUG=0", f"DEBUG={int(report.debug)}"),
        check("policy.migrate_ma", policy.allow_migrate_ma or not report.migrate_ma, "MIGRATE_MA=0",
              f"MIGRATE_MA={int(report.migrate_ma)}"),
        check("policy.smt", policy.allow_smt or not report.smt_allowed, "SMT=0", f"SMT={int(report.smt_allowed)}"),
        check("policy.guest_svn", report.guest_svn >= policy.min_guest_svn, f">= {policy.min_guest_svn}", report.guest_svn),
        check("policy.firmware", report.current_firmware >= _version_tuple(policy.min_firmware),
              f">= {policy.min_firmware}", ".".join(map(str, report.current_firmware))),
    ]
    if policy.require_single_socket:
        out.append(check("policy.single_socket", report.single_socket, "SINGLE_SOCKET=1",
                         f"SINGLE_SOCKET={int(report.single_socket)}"))
    if policy.require_platform:
        flags = report.platform_flags()
        out.append(check("policy.platform_info", set(policy.require_platform) <= set(flags),
                         f"set: {', '.join(policy.require_platform)}", f"set: {', '.join(flags) or 'none'}"))
    if policy.products:
        out.append(check("policy.product", product in policy.products, policy.products, product))
    if policy.vlek_csp_ids and report.signing_key == "vlek":
        csp = _csp_id(key_cert)
        out.append(check("policy.vlek_csp_id", csp in policy.vlek_csp_ids, f"one of {policy.vlek_csp_ids}", csp))
    if policy.measurements:
        allowed = {m.lower() for m in policy.measurements}
        out.append(check("policy.measurement", report.measurement.hex() in allowed, f"one of {len(allowed)} allowed",
                         report.measurement.hex()))
    elif policy.production:  # "any image" is no production policy: it releases nothing until the owner pins one
        out.append(check("policy.measurement", False, "a launch MEASUREMENT the data owner approved: this production "
                         "policy pins none (pin your image's: `medtee image measure ... --into POLICY.yaml`)",
                         report.measurement.hex()))
    if policy.host_data is not None:
        out.append(check("policy.host_data", report.host_data.hex() == policy.host_data.lower(), policy.host_data.lower(),
                         report.host_data.hex()))
    if policy.vmpl is not None:
        out.append(check("policy.vmpl", report.vmpl == policy.vmpl, policy.vmpl, report.vmpl))
    if product is None:
        out.append(check("policy.min_tcb", False, "a known product to decode REPORTED_TCB", "unknown product"))
        return out
    launch = Tcb.decode(report.launch_tcb_raw, product)  # the TCB the guest was launched under: a later firmware
    floor, source = policy.tcb_floor(product), ("min_tcb_by_product." + product
                                                 if product in policy.min_tcb_by_product else "min_tcb")
    for name, value in report.reported_tcb(product).components().items():  # update does not undo its launch
        minimum = getattr(floor, name)
        out.append(check(f"policy.min_tcb.{name}", value >= minimum, f">= {minimum} ({source})", value))
        out.append(check(f"policy.launch_tcb.{name}", getattr(launch, name) >= minimum, f">= {minimum} ({source})",
                         getattr(launch, name)))
    return out


def _product_from(checks: list[Check], report: SnpReport) -> str | None:
    for c in checks:
        if c.name == "amd.product" and c.ok:
            return c.actual
    return report.product


def snp_checks(evidence: Evidence, policy: AttestationPolicy, expected_report_data: bytes | None,
               now: datetime, newest: Newest | None = None) -> list[Check]:
    """The CPU report: its authenticity (or SIMULATED signature), its binding and, unless authenticity_only, the
    policy's requirements."""
    if not evidence.snp_report:
        return [check("snp.report", False, "an SEV-SNP report", "none in the evidence")]
    try:
        report = SnpReport.parse(evidence.snp_report)
    except ReportFormatError:
        return [check("snp.report.format", False, f"a {REPORT_SIZE}-byte SEV-SNP report",
                      f"{len(evidence.snp_report)} bytes")]
    if policy.allow_simulated and evidence.simulated:
        from medtee.attestation.simulated import simulated_signature_checks

        checks = structure_checks(report, report.product) + simulated_signature_checks(report, evidence.certificates)
        key_cert = None
    else:
        checks, key_cert = snp_authenticity(report, evidence.certificates, policy, now)
    checks += binding_checks(report, expected_report_data, policy)
    if not policy.authenticity_only:
        product = _product_from(checks, report)
        checks += snp_policy_checks(report, product, policy, key_cert)
        if policy.amd_revocation is not Revocation.off and not evidence.simulated:
            checks.append(revocation_check(product, report.signing_key, key_cert, policy.cert_cache_dir,
                                           policy.amd_revocation, now, newest))
    return checks


def appraise(evidence: Evidence, policy: AttestationPolicy, *, expected_report_data: bytes | None,
             now: datetime | None = None, expected_gpu_nonce: bytes | None = None,
             recipe_digest: str | None = None, recipe: dict | None = None, newest: Newest | None = None) -> Verdict:
    """Appraise evidence under a policy; every failed check is listed in the verdict. It raises for no evidence content:
    what cannot be parsed fails a check naming the part, its position and the problem.

    `expected_report_data` is what the relying party computed with binding.report_data(...) (covering
    evidence.gpu_evidence_digests()); `expected_gpu_nonce` is binding.gpu_nonce(...) when GPU evidence is expected.
    GPU evidence alone (no CPU report) is appraised only under an authenticity_only policy with no expected
    REPORT_DATA (an auditor's check); otherwise the missing report fails `snp.report`.
    Given the `recipe_digest` bound into `expected_report_data` (a key release, or a receipt of one) and the `recipe`
    it covers (`config.digest_input`), the policy's recipe rules are checked too. With `newest` (an appraiser's
    record of the revocation documents it accepted), an older AMD CRL or NVIDIA OCSP answer than one accepted before
    does not establish revocation status (`medtee.attestation.freshness`).
    """
    now = now or datetime.now(timezone.utc)
    checks = [check("evidence.simulated", policy.allow_simulated or not evidence.simulated,
                    "hardware evidence" if not policy.allow_simulated else "hardware or SIMULATED evidence",
                    "SIMULATED" if evidence.simulated else "hardware")]
    gpu_alone = evidence.gpus and not evidence.snp_report and policy.authenticity_only and expected_report_data is None
    if not gpu_alone:
        checks += snp_checks(evidence, policy, expected_report_data, now, newest)
    checks += gpu_checks(evidence, policy, expected_gpu_nonce, now, newest)
    if recipe_digest is not None and not policy.authenticity_only:
        checks += recipe_checks(policy.recipe, recipe_digest, recipe)
    return Verdict.of(checks, simulated=evidence.simulated, policy=policy.name)


def _key_digest(value: object) -> str:
    """The sha256 hex a recipe records for a key file (`sha256:HEX`), else the value as text."""
    return value[len("sha256:"):] if isinstance(value, str) and value.startswith("sha256:") else str(value)


_ABSENT = object()


def _setting(recipe: dict, dotted: str) -> object:
    """The recipe's value at `dotted`, or _ABSENT when it has no such setting (None is a value: a setting left unset)."""
    node: object = recipe
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _recipe_value(recipe: dict, dotted: str) -> object:
    """The recipe's value at `dotted`, None when it has none."""
    value = _setting(recipe, dotted)
    return None if value is _ABSENT else value


def _same(a: object, b: object) -> bool:
    """Equal as a recipe means it: numbers by value, but true is not 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _admits(rule: FieldRule, value: object) -> bool:
    return ((rule.one_of is None or any(_same(value, allowed) for allowed in rule.one_of))
            and (rule.min is None or (_number(value) and value >= rule.min))
            and (rule.max is None or (_number(value) and value <= rule.max)))


def _admits_sweep(rule: FieldRule, d: object) -> bool:
    """Whether every value a sweep parameter's distribution `d` (as the recipe records it) can give passes `rule`."""
    import math

    if not isinstance(d, dict):
        return False
    if d.get("type") == "categorical":
        return isinstance(d.get("choices"), list) and bool(d["choices"]) and all(_admits(rule, v) for v in d["choices"])
    low, high, step = d.get("low"), d.get("high"), d.get("step")
    if d.get("type") not in ("int", "float") or not all(_number(v) and math.isfinite(v) for v in (low, high)) or \
            low > high or not (step is None or (_number(step) and step > 0)):
        return False
    integer = d["type"] == "int"
    if step is None and integer:
        step = 1
    spans = (high - low) / step if step is not None else math.inf
    count = math.floor(spans + 1e-9) + 1 if math.isfinite(spans) else math.inf  # values from low on
    top = high if step is None else low + (count - 1) * step
    if (rule.min is not None and low < rule.min) or (rule.max is not None and top > rule.max):
        return False
    if rule.one_of is None:
        return True
    if count > len(rule.one_of):  # more distinct values than the rule allows
        return False
    return all(_admits(rule, int(low + i * step) if integer else round(low + i * step, 12)) for i in range(count))


def _shown(value: object) -> str:
    """A recipe value as its JSON (so "8" reads apart from 8, true from 1), one printable line."""
    import json

    return json.dumps(value, ensure_ascii=True, sort_keys=True)


def _shown_sweep(d: object) -> str:
    if isinstance(d, dict) and d.get("type") == "categorical":
        return f"swept over {_shown(d.get('choices'))}"
    if isinstance(d, dict):
        low, high, step = (_shown(d.get(k)) for k in ("low", "high", "step"))
        return f"swept over {d.get('type')} {low}..{high} step {step}"
    return f"swept over {_shown(d)}"


def field_check(rule: FieldRule, recipe: dict) -> Check:
    """`policy.recipe.field[KEY]`: the recipe's setting satisfies the data owner's rule for it; in a sweep that varies
    the setting, every value its search space can give a trial must."""
    wanted = [f"one of {_shown(rule.one_of)}"] if rule.one_of is not None else []
    wanted += [f">= {rule.min:g}"] if rule.min is not None else []
    wanted += [f"<= {rule.max:g}"] if rule.max is not None else []
    name = f"policy.recipe.field[{rule.key}]"
    space = _setting(recipe, "sweep.parameters") if _setting(recipe, "mode") == "sweep" else _ABSENT
    inside = sorted(k for k in space if k.startswith(rule.key + ".")) if isinstance(space, dict) else []
    if inside:
        return check(name, False, " and ".join(wanted), f"the sweep varies {', '.join(inside)} in it"[:200])
    if isinstance(space, dict) and rule.key in space:
        return check(name, _admits_sweep(rule, space[rule.key]), " and ".join(wanted) + " for every trial",
                     _shown_sweep(space[rule.key])[:200])
    value = _setting(recipe, rule.key)
    if value is _ABSENT:
        return check(name, False, " and ".join(wanted),
                     "no such setting in the recipe the digest covers (`medtee recipes digest --json` lists them)")
    return check(name, _admits(rule, value), " and ".join(wanted), _shown(value)[:200])


def canonical_digest(recipe: object) -> str | None:
    """The SHA-256 hex of `recipe` as config.recipe_digest hashes it (its canonical JSON), None for no JSON value."""
    import hashlib
    import json

    try:
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                         allow_nan=False).encode()).hexdigest()
    except (TypeError, ValueError):
        return None


def recipe_checks(rules: RecipeRules, recipe_digest: str, recipe: dict | None) -> list[Check]:
    """The policy's recipe rules on the recipe a release is for: `recipe` must hash to `recipe_digest`."""
    out = []
    if rules.digests:
        out.append(check("policy.recipe.digest", recipe_digest in set(rules.digests),
                         f"one of {len(rules.digests)} approved recipe digests", recipe_digest))
    if not rules.read_recipe():
        return out
    if not isinstance(recipe, dict):
        return out + [check("policy.recipe", False, "the recipe the digest covers (sent with the release request)",
                            "none given")]
    hashed = canonical_digest(recipe) or "not canonical JSON"
    if hashed != recipe_digest:
        return out + [check("policy.recipe", False, f"a recipe hashing to the digest {recipe_digest}", hashed)]
    mode = _recipe_value(recipe, "mode")
    out.append(check("policy.recipe.mode", mode in rules.modes, f"one of {rules.modes}", mode))
    if mode == "generate" and rules.study_recipients:
        study = _key_digest(_recipe_value(recipe, "evaluation.study_recipient"))
        out.append(check("policy.recipe.study_recipient", study in rules.study_recipients,
                         f"one of {len(rules.study_recipients)} approved study keys (sha256)", study))
    if rules.output_recipients:
        recipient = _key_digest(_recipe_value(recipe, "output.recipient"))
        out.append(check("policy.recipe.output_recipient", recipient in rules.output_recipients,
                         f"one of {len(rules.output_recipients)} approved recipient keys (sha256)", recipient))
    if rules.require_audit:
        audit = _recipe_value(recipe, "release.require_audit")
        out.append(check("policy.recipe.require_audit", audit is True, "release.require_audit: true", audit))
        out += _audit_floor_checks(rules.audit, recipe)
    if rules.require_dp:
        dp = _recipe_value(recipe, "privacy.dp.enabled")
        out.append(check("policy.recipe.require_dp", dp is True, "privacy.dp.enabled: true", dp))
    aggregate = _recipe_value(recipe, "tracking.min_aggregate")
    out.append(check("policy.recipe.min_aggregate", isinstance(aggregate, int) and aggregate >= rules.min_aggregate,
                     f"tracking.min_aggregate >= {rules.min_aggregate}", aggregate))
    return out + [field_check(rule, recipe) for rule in rules.fields]


def _audit_floor_checks(floor, recipe: dict) -> list[Check]:
    """The recipe's audit at least as strict as the policy's floor: every exposure threshold (the per-repeat
    overrides too), the extraction rate, and the size of the test."""
    overrides = _recipe_value(recipe, "release.max_exposure_at")  # {repeats: bits}; absent: fails closed
    limits = [_recipe_value(recipe, "release.max_exposure_bits"),
              *(overrides.values() if isinstance(overrides, dict) else [overrides])]
    exposure = all(_number(v) and v <= floor.max_exposure_bits for v in limits)
    out = [check("policy.recipe.audit.max_exposure_bits", exposure,
                 f"release.max_exposure_bits and every release.max_exposure_at value <= {floor.max_exposure_bits}",
                 limits)]
    for name, key, bound, at_most in (
            ("max_extraction_above_base", "release.max_extraction_above_base", floor.max_extraction_above_base, True),
            ("min_references", "release.references", floor.min_references, False),
            ("min_extraction_examples", "release.extraction_examples", floor.min_extraction_examples, False),
            ("max_suffix_tokens", "release.suffix_tokens", floor.max_suffix_tokens, True)):
        value = _recipe_value(recipe, key)
        ok = _number(value) and (value <= bound if at_most else value >= bound)
        out.append(check(f"policy.recipe.audit.{name}", ok, f"{key} {'<=' if at_most else '>='} {bound}", value))
    return out


def gpu_checks(evidence: Evidence, policy: AttestationPolicy, expected_nonce: bytes | None,
               now: datetime, newest: Newest | None = None) -> list[Check]:
    """Each GPU's evidence; a policy naming a GPU provider (or gpu.required) needs at least one."""
    out: list[Check] = []
    if (policy.gpu_provider or policy.gpu.required) and not policy.authenticity_only:
        out.append(check("gpu.present", bool(evidence.gpus), "evidence from at least one GPU", len(evidence.gpus)))
    if evidence.gpus:
        from medtee.attestation.nvidia import gpu_evidence_checks

        for i, gpu in enumerate(evidence.gpus):
            out += gpu_evidence_checks(gpu, policy, expected_nonce=expected_nonce, now=now, label=f"gpu[{i}]",
                                       newest=newest)
    return out
