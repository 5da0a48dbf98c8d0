"""What ftpipe knows about licenses: their properties, and how Hugging Face ids map to SPDX.

Data only; ftpipe.compliance.licenses applies it. A license not in LICENSE_PROPERTIES is "unknown" to the
license gate, even when it is a valid SPDX id: obligations are never guessed. To support one, add
a row here after reading its text.

The properties describe what the license asks of a model fine-tuned on (or from) the licensed
material, read conservatively: where it is unsettled whether a trained model is a derivative work
of its training data (GPL code, ODbL, CDLA-Sharing), the table assumes it is and says so in notes.
This is an engineering aid for a reviewer, not legal advice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a license's terms reach the fine-tuned model ("none": they do not).
Copyleft = Literal["none", "pass-through-terms", "weak-copyleft", "share-alike", "copyleft", "network-copyleft"]

# Ranks for choosing the least restrictive option of an OR: lower is less restrictive.
# pass-through-terms (use policies that must accompany the model, e.g. Llama, Gemma, OpenRAIL) ranks
# with weak copyleft: they bind use, not the license you choose for your own changes.
COPYLEFT_RANK: dict[str, int] = {"none": 0, "pass-through-terms": 1, "weak-copyleft": 1, "share-alike": 2,
                                 "copyleft": 3, "network-copyleft": 4}


@dataclass(frozen=True)
class LicenseProperties:
    license_id: str           # canonical SPDX id, or a LicenseRef- id for a license SPDX does not list
    commercial_use: bool      # may the fine-tuned model be used commercially?
    copyleft: Copyleft
    no_derivatives: bool      # forbids adaptations; a fine-tuned model is one
    attribution: str | None   # what a distributor of the model must do to credit; None: nothing
    notes: str                # conditions the fields above cannot express; "" if none

    @property
    def share_alike(self) -> bool:
        return self.copyleft != "none"


def _cc(variant: str, version: str) -> LicenseProperties:
    """A Creative Commons license: BY always requires credit; NC, SA and ND add their restriction."""
    section = "3(a)" if version == "4.0" else "4(b)"   # where the attribution clause sits in each version
    parts = variant.split("-")
    return LicenseProperties(
        license_id=f"CC-{variant}-{version}", commercial_use="NC" not in parts,
        copyleft="share-alike" if "SA" in parts else "none", no_derivatives="ND" in parts,
        attribution=(f"credit the creator, keep the copyright notice, link CC {variant} {version} and say "
                     f"that the material was changed (section {section})"),
        notes="")


def _llama(version: str, credit: str, extra_notes: str) -> LicenseProperties:
    """A Meta Llama community license: commercial use allowed, with conditions that travel with the model."""
    return LicenseProperties(
        license_id=f"LicenseRef-Llama{version}-Community", commercial_use=True, copyleft="pass-through-terms",
        no_derivatives=False,
        attribution=f"{credit}; ship a copy of the Llama {version} Community License and its Notice file",
        notes=("commercial use needs a separate license from Meta if the licensee's products had more than "
               "700 million monthly active users; Meta's Acceptable Use Policy binds every user of the model"
               + extra_notes))


_NO_IMPROVING_OTHER_LLMS = "; its outputs may not be used to improve other large language models"

_ROWS = [
    LicenseProperties("Apache-2.0", True, "none", False,
                      "keep the copyright, patent and attribution notices and the license text; pass on the "
                      "source's NOTICE file if it has one (section 4)", ""),
    LicenseProperties("MIT", True, "none", False, "include the copyright notice and the MIT permission notice", ""),
    LicenseProperties("BSD-2-Clause", True, "none", False,
                      "include the copyright notice, the two conditions and the disclaimer", ""),
    LicenseProperties("BSD-3-Clause", True, "none", False,
                      "include the copyright notice, the three conditions and the disclaimer", "the authors' "
                      "names may not be used to endorse the model"),
    LicenseProperties("PSF-2.0", True, "none", False,
                      "keep the PSF copyright notice and license agreement, and summarize the changes made "
                      "(sections 2 and 3)", ""),
    LicenseProperties("CC0-1.0", True, "none", False, None, ""),
    LicenseProperties("Unlicense", True, "none", False, None, ""),
    *[_cc(variant, version) for version in ("3.0", "4.0")
      for variant in ("BY", "BY-SA", "BY-NC", "BY-NC-SA", "BY-ND", "BY-NC-ND")],
    LicenseProperties("ODC-By-1.0", True, "none", False,
                      "attribute the database as its licensor asks, in any public use of it or of works "
                      "produced from it (section 4.2)", ""),
    LicenseProperties("ODbL-1.0", True, "share-alike", False,
                      "attribute the database in works produced from it (section 4.3)",
                      "share-alike binds adapted databases (section 4.4); a model is arguably a produced work "
                      "that needs only attribution, but it is treated as share-alike until a reviewer decides"),
    LicenseProperties("CDLA-Permissive-2.0", True, "none", False, None,
                      "no obligations on Results such as a trained model; sharing the data itself needs the "
                      "license text"),
    LicenseProperties("CDLA-Sharing-1.0", True, "share-alike", False,
                      "keep the data's attribution notices when sharing it",
                      "share-alike binds shared and enhanced data; computational results are arguably free, "
                      "but a model is treated as share-alike until a reviewer decides"),
    *[LicenseProperties(spdx_id, True, copyleft, False,
                        "keep the copyright notices and the license text; offer the corresponding source",
                        "whether a model trained on this material is a derivative work is unsettled; treated "
                        "as one")
      for spdx_id, copyleft in (("GPL-3.0-only", "copyleft"), ("GPL-3.0-or-later", "copyleft"),
                                ("AGPL-3.0-only", "network-copyleft"), ("LGPL-3.0-only", "weak-copyleft"))],
    _llama("2", "keep the Llama 2 copyright line in the Notice file", _NO_IMPROVING_OTHER_LLMS),
    _llama("3", 'display "Built with Meta Llama 3"; begin the model\'s name with "Llama 3"', _NO_IMPROVING_OTHER_LLMS),
    *[_llama(version, 'display "Built with Llama"; begin the model\'s name with "Llama"', "")
      for version in ("3.1", "3.2", "3.3")],
    LicenseProperties("LicenseRef-Gemma", True, "pass-through-terms", False,
                      "ship the notice \"Gemma is provided under and subject to the Gemma Terms of Use found "
                      "at ai.google.dev/gemma/terms\" and a copy of the terms; mark modified files",
                      "the Gemma Prohibited Use Policy must be passed on as an enforceable term to every "
                      "recipient of the model"),
    LicenseProperties("LicenseRef-OpenRAIL", True, "pass-through-terms", False,
                      "keep the copyright and attribution notices and include the license",
                      "its use-based restrictions must be included in the license of every derivative; "
                      "'openrail' names a family: check the model card for the exact variant"),
]

LICENSE_PROPERTIES: dict[str, LicenseProperties] = {row.license_id: row for row in _ROWS}

# Hugging Face card ids (lowercase) -> SPDX or LicenseRef- ids of LICENSE_PROPERTIES.
# gpl-3.0, agpl-3.0 and lgpl-3.0 are SPDX's deprecated ids, which SPDX defines as the -only variants.
HF_LICENSE_IDS: dict[str, str] = {
    "apache-2.0": "Apache-2.0", "mit": "MIT", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
    "cc0-1.0": "CC0-1.0", "unlicense": "Unlicense",
    "cc-by-3.0": "CC-BY-3.0", "cc-by-4.0": "CC-BY-4.0", "cc-by-sa-3.0": "CC-BY-SA-3.0", "cc-by-sa-4.0": "CC-BY-SA-4.0",
    "cc-by-nc-3.0": "CC-BY-NC-3.0", "cc-by-nc-4.0": "CC-BY-NC-4.0",
    "cc-by-nc-sa-3.0": "CC-BY-NC-SA-3.0", "cc-by-nc-sa-4.0": "CC-BY-NC-SA-4.0",
    "cc-by-nd-4.0": "CC-BY-ND-4.0", "cc-by-nc-nd-3.0": "CC-BY-NC-ND-3.0", "cc-by-nc-nd-4.0": "CC-BY-NC-ND-4.0",
    "odc-by": "ODC-By-1.0", "odbl": "ODbL-1.0",
    "cdla-permissive-2.0": "CDLA-Permissive-2.0", "cdla-sharing-1.0": "CDLA-Sharing-1.0",
    "gpl-3.0": "GPL-3.0-only", "agpl-3.0": "AGPL-3.0-only", "lgpl-3.0": "LGPL-3.0-only",
    "llama2": "LicenseRef-Llama2-Community", "llama3": "LicenseRef-Llama3-Community",
    "llama3.1": "LicenseRef-Llama3.1-Community", "llama3.2": "LicenseRef-Llama3.2-Community",
    "llama3.3": "LicenseRef-Llama3.3-Community",
    "gemma": "LicenseRef-Gemma", "openrail": "LicenseRef-OpenRAIL",
}

# Hugging Face ids that name no single license: flagged unknown, with the reason.
HF_IDS_NAMING_NO_LICENSE: dict[str, str] = {
    "other": "on Hugging Face 'other' means the license is described in the card's text",
    "unknown": "on Hugging Face 'unknown' means the uploader did not know the license",
    "bsd": "'bsd' names no BSD variant", "cc": "'cc' names no Creative Commons license",
    "gpl": "'gpl' names no GPL version", "lgpl": "'lgpl' names no LGPL version",
}
