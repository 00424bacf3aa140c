"""What Microsoft's AADSTS error codes mean for someone running mail2blob, and what to do.

Source: Microsoft's AADSTS reference and the issue trackers of comparable tools (see the README's
troubleshooting table, which is generated from the same data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class AadstsAdvice:
    code: str
    meaning: str
    action: str
    reconsent: bool  # True when opening the consent link again fixes it


_CONSENT = "Open the consent link again (or run `python -m mail2blob consent`)."

ADVICE: dict[str, AadstsAdvice] = {
    a.code: a
    for a in (
        AadstsAdvice(
            "AADSTS700082",
            "the refresh token expired: unused for 90 days, or a rotated token was never saved",
            _CONSENT,
            True,
        ),
        AadstsAdvice(
            "AADSTS50173",
            "the grant was revoked (password reset by an admin or sessions revoked)",
            _CONSENT,
            True,
        ),
        AadstsAdvice(
            "AADSTS70008",
            "the refresh token or authorization code expired or was revoked",
            _CONSENT,
            True,
        ),
        AadstsAdvice(
            "AADSTS70000",
            "the grant is invalid or was already used (a rotated refresh token)",
            _CONSENT,
            True,
        ),
        AadstsAdvice(
            "AADSTS70043",
            "Conditional Access sign-in frequency ended the session",
            _CONSENT + " Ask your admin to exclude this app from sign-in frequency if it recurs.",
            True,
        ),
        AadstsAdvice("AADSTS50076", "multi-factor authentication is now required", _CONSENT, True),
        AadstsAdvice(
            "AADSTS65001",
            "consent is missing for the app's permissions (admin consent may be required)",
            "An admin grants consent for IMAP.AccessAsUser.All and offline_access "
            "(Entra admin center > App registrations > API permissions > Grant admin consent).",
            True,
        ),
        AadstsAdvice(
            "AADSTS65004", "the user declined consent", _CONSENT + " Accept this time.", True
        ),
        AadstsAdvice(
            "AADSTS50011",
            "the redirect URI is not registered on the app registration",
            "Register the exact redirect URI shown on the page as a Web redirect URI.",
            False,
        ),
        AadstsAdvice(
            "AADSTS500113",
            "no redirect URI is registered on the app registration",
            "Register the redirect URI as a Web redirect URI.",
            False,
        ),
        AadstsAdvice(
            "AADSTS900971",
            "no reply address was provided",
            "Register the redirect URI as a Web redirect URI.",
            False,
        ),
        AadstsAdvice(
            "AADSTS50194",
            "the app is single-tenant but the common endpoint was used",
            "Set MAIL2BLOB_TENANT_ID to the tenant id (not 'common').",
            False,
        ),
        AadstsAdvice(
            "AADSTS700016",
            "the client id is not known in this tenant",
            "Check MAIL2BLOB_CLIENT_ID and MAIL2BLOB_TENANT_ID.",
            False,
        ),
        AadstsAdvice(
            "AADSTS90002", "the tenant was not found", "Check MAIL2BLOB_TENANT_ID.", False
        ),
        AadstsAdvice(
            "AADSTS7000222",
            "the client secret expired",
            "Create a new client secret (or switch to the federated credential) and update "
            "MAIL2BLOB_CLIENT_SECRET.",
            False,
        ),
        AadstsAdvice(
            "AADSTS7000215",
            "the client secret is wrong",
            "Use the secret's value, not its id, in MAIL2BLOB_CLIENT_SECRET.",
            False,
        ),
        AadstsAdvice(
            "AADSTS7000218",
            "the request needs a client secret or assertion",
            "Set MAIL2BLOB_CLIENT_SECRET or MAIL2BLOB_FIC_CLIENT_ID, or allow public client flows "
            "on the app registration for device-code consent.",
            False,
        ),
        AadstsAdvice(
            "AADSTS700025",
            "a public client sent a client secret",
            "Remove MAIL2BLOB_CLIENT_SECRET for a public client app registration.",
            False,
        ),
        AadstsAdvice(
            "AADSTS700213",
            "no federated identity credential matches the managed identity",
            "Check the app registration's federated credential (issuer, subject = the managed "
            "identity's principal id, audience api://AzureADTokenExchange).",
            False,
        ),
        AadstsAdvice(
            "AADSTS900144",
            "a required parameter is missing (often offline_access not granted)",
            "Add the delegated permission offline_access to the app registration.",
            False,
        ),
        AadstsAdvice(
            "AADSTS54005",
            "the authorization code was already redeemed",
            "Start the consent again from the consent link.",
            True,
        ),
        AadstsAdvice(
            "AADSTS501481",
            "the code verifier did not match (PKCE)",
            "Start the consent again from the consent link.",
            True,
        ),
    )
}

_CODE = re.compile(r"AADSTS\d+")


def extract_code(result: dict | None) -> str | None:
    """The AADSTS code of an MSAL error result (from ``error_codes`` or the description)."""
    if not result:
        return None
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes:
        return f"AADSTS{codes[0]}"
    return code_in(str(result.get("error_description", "")))


def code_in(text: str) -> str | None:
    """The first AADSTS code in ``text`` (an error message), if any."""
    match = _CODE.search(text)
    return match.group(0) if match else None


def describe(code: str | None, error: str | None = None) -> str:
    """One sentence: the code, what it means and what to do."""
    if code and code in ADVICE:
        advice = ADVICE[code]
        return f"{code}: {advice.meaning}. {advice.action}"
    if code:
        return f"{code} (error {error or 'unknown'}): see Microsoft's AADSTS error reference."
    return f"error {error or 'unknown'} from the identity platform"


def needs_reconsent(code: str | None, error: str | None) -> bool:
    if code and code in ADVICE:
        return ADVICE[code].reconsent
    return error in ("invalid_grant", "interaction_required", "consent_required")
