"""kernelhub.sandbox.doctor's judgement of bubblewrap advisories (pure): by version, and by setuid."""

from __future__ import annotations

from kernelhub.sandbox import doctor


def test_advisories_by_version_and_setuid() -> None:
    old = {c.name: c for c in doctor.advisories("bubblewrap 0.4.0", setuid=True)}
    assert not old["bwrap CVE-2020-5291 (GHSA-j2qp-rvxj-43vj)"].ok
    assert "predates the fix in 0.4.1" in old["bwrap CVE-2020-5291 (GHSA-j2qp-rvxj-43vj)"].detail
    setuid = {c.name: c for c in doctor.advisories("bubblewrap 0.8.0", setuid=True)}
    assert not setuid["bwrap CVE-2020-5291 (GHSA-j2qp-rvxj-43vj)"].ok
    here = doctor.advisories("bubblewrap 0.8.0", setuid=False)
    assert [c.ok for c in here] == [True] * len(doctor.BWRAP_ADVISORIES)
    assert all(not c.required for c in here)  # informational: the checks that matter are the real attempts
    assert doctor.advisories("no version here", setuid=False)[0].ok
