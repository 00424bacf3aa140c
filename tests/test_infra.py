"""Static checks of ``infra/`` (the Bicep CLI cannot run here): the Bicep sets exactly the settings
the code reads, the redirect URI is the consent callback route, the permissions and role ids are
the right ones, and the resources keep their hardening.

Pure text checks, so they run in milliseconds in the main venv. ``scripts/check-infra`` parses
every file with pycep-parser and scans them with checkov, from their own venv (.venv-checkov).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

from mail2blob.settings import IMAP_APP_SCOPE, IMAP_SCOPE, SETTING_NAMES, Settings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
REGISTRATION = INFRA / "app" / "registration.bicep"
RBAC = INFRA / "app" / "rbac.bicep"
FUNCTION_APP = INFRA / "core" / "host" / "functions-flex.bicep"
STORAGE = INFRA / "core" / "storage" / "storage-account.bicep"
KEY_VAULT = INFRA / "core" / "security" / "keyvault.bicep"
MONITORING = INFRA / "core" / "monitor" / "monitoring.bicep"

#: Settings the code reads that Azure must never get: no secret exists (a federated credential
#: replaces it) and Azure's endpoints chain to public roots.
NOT_DEPLOYED = {"MAIL2BLOB_CLIENT_SECRET", "MAIL2BLOB_CA_BUNDLE"}

#: Settings Flex Consumption rejects (its runtime lives in functionAppConfig).
FLEX_REJECTS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_TIME_ZONE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
}

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
#: Delegated permission ids on Microsoft Graph (../shared/notes, checked against public app
#: registrations that request them).
GRAPH_DELEGATED = {
    "IMAP.AccessAsUser.All": "652390e4-393a-48de-9484-05f9b1212954",
    "offline_access": "7427e0e9-2fba-42fe-b0c0-848c9e6a8182",
    "openid": "37f7f235-527c-4136-accd-4a02d197296e",
    "profile": "14dad69e-099b-42c9-810b-d002981feec1",
}
#: Application permission (app role) on Office 365 Exchange Online.
EXCHANGE_APP_ROLES = {"IMAP.AccessAsApp": "5e5addcd-3e8d-4e90-baf5-964efab2b20a"}

#: Built-in role definition ids (../shared/notes/azure.md; Blob Data Reader from Azure docs).
ROLE_IDS = {
    "storageBlobDataOwner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "storageBlobDataContributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "storageBlobDataReader": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",
    "storageQueueDataContributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "storageTableDataContributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "monitoringMetricsPublisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "keyVaultSecretsOfficer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
}


def _strip_comments(text: str) -> str:
    """Bicep source without ``//`` and ``/* */`` comments (strings, URLs included, kept intact)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == "'":
                in_string = False
            i += 1
        elif ch == "'":
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


@cache
def code(path: Path) -> str:
    """A Bicep file's text without comments."""
    return _strip_comments(path.read_text(encoding="utf-8"))


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def all_code() -> str:
    return "\n".join(code(p) for p in bicep_files())


def var(path: Path, name: str) -> str:
    """The right-hand side of a one-line ``var name = ...``."""
    match = re.search(rf"^var {name} = (.+)$", code(path), re.MULTILINE)
    assert match, f"no var {name} in {path.name}"
    return match.group(1).strip()


def string_var(path: Path, name: str) -> str:
    value = var(path, name)
    assert value.startswith("'") and value.endswith("'"), f"{name} is not a string literal"
    return value[1:-1]


def block(path: Path, opening: str) -> str:
    """The bracket-balanced block that starts at ``opening``, which ends with ``{`` or ``[``."""
    text = code(path)
    start = text.index(opening)
    pairs = {"{": "}", "[": "]"}
    open_ch = opening[-1]
    depth = 0
    for i in range(start + len(opening) - 1, len(text)):
        depth += {open_ch: 1, pairs[open_ch]: -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    raise AssertionError(f"unbalanced block after {opening!r} in {path.name}")


def params(path: Path) -> dict[str, str | None]:
    """``param`` names of a file with their default expression (None when required)."""
    found: dict[str, str | None] = {}
    for match in re.finditer(r"^param (\w+) \w+(?: = (.+))?$", code(path), re.MULTILINE):
        found[match.group(1)] = match.group(2)
    return found


def deployed_settings() -> dict[str, str]:
    """The MAIL2BLOB_* entries of main.bicep's settings map: name -> value expression."""
    body = block(MAIN, "var mail2blobSettings = {")
    return dict(re.findall(r"^\s*(MAIL2BLOB_[A-Z0-9_]+): (.+)$", body, re.MULTILINE))


# --- layout ---------------------------------------------------------------------------------


def test_layout_and_graph_extension() -> None:
    assert re.search(r"^targetScope = 'subscription'$", code(MAIN), re.MULTILINE)
    config = json.loads((INFRA / "bicepconfig.json").read_text(encoding="utf-8"))
    graph = config["extensions"]["microsoftGraphV1"]
    assert graph.startswith("br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:")
    # Only the file with Microsoft.Graph resources declares the extension.
    for path in bicep_files():
        uses_graph = "'Microsoft.Graph/" in code(path)
        declares = re.search(r"^extension microsoftGraphV1$", code(path), re.MULTILINE)
        assert bool(declares) == uses_graph, path.name


def test_modules_and_abbreviations_exist() -> None:
    modules = re.findall(r"^module \w+ '([^']+)'", code(MAIN), re.MULTILINE)
    assert len(modules) >= 7
    for module in modules:
        assert (INFRA / module).is_file(), module
    abbreviations = json.loads((INFRA / "abbreviations.json").read_text(encoding="utf-8"))
    used = set(re.findall(r"abbrs\.(\w+)", code(MAIN)))
    assert used and used <= abbreviations.keys()


def test_every_name_is_generated_and_overridable() -> None:
    body = block(MAIN, "var names = {")
    entries = re.findall(r"^\s*(\w+): (.+)$", body, re.MULTILINE)
    assert len(entries) == 12
    for key, expr in entries:
        override = re.match(r"!empty\((\w+)\) \? \1 : '(.+)'$", expr)
        assert override, f"names.{key} has no override parameter: {expr}"
        assert params(MAIN)[override.group(1)] == "''", override.group(1)
        generated = override.group(2)
        assert "${resourceToken}" in generated or "${environmentName}" in generated, key


def test_outputs_are_upper_snake_and_include_the_consent_link() -> None:
    outputs = re.findall(r"^output (\w+) ", code(MAIN), re.MULTILINE)
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", name) for name in outputs), outputs
    assert {"CONSENT_URL", "CONSENT_URL_COMMAND", "ARCHIVE_CONTAINER_URL"} <= set(outputs)
    # Outputs land in azd's .env: none may look like an app setting.
    assert not [name for name in outputs if name.startswith("MAIL2BLOB_")]


def test_parameters_file_matches_main() -> None:
    data = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    declared = params(MAIN)
    given = data["parameters"]
    assert set(given) <= set(declared)
    required = {name for name, default in declared.items() if default is None}
    assert required == {"environmentName", "location", "mailbox"}
    assert required <= set(given)


def test_azure_yaml_service_is_the_tagged_function_app() -> None:
    text = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    services = re.search(r"^services:\n  ([\w-]+):\n((?:    .*\n|\s*\n)+)", text, re.MULTILINE)
    assert services, "azure.yaml has no service"
    assert services.group(1) == string_var(MAIN, "serviceName")
    assert "host: function" in services.group(2) and "language: python" in services.group(2)
    assert "'azd-service-name': serviceName" in code(MAIN)


# --- settings -------------------------------------------------------------------------------


def test_bicep_sets_exactly_the_settings_the_code_reads() -> None:
    text = all_code()
    keys = re.findall(r"^\s*'?(MAIL2BLOB_[A-Z0-9_]+)'?:", text, re.MULTILINE)
    keys += re.findall(r"name: '(MAIL2BLOB_[A-Z0-9_]+)'", text)
    assert sorted(keys) == sorted(SETTING_NAMES - NOT_DEPLOYED), "missing, stale or set twice"
    assert set(deployed_settings()) == SETTING_NAMES - NOT_DEPLOYED
    assert not [name for name in NOT_DEPLOYED if name in text]


def test_sample_settings_list_every_setting() -> None:
    sample = ROOT / "local.settings.sample.json"
    if not sample.is_file():
        pytest.skip("local.settings.sample.json not written yet")
    values = json.loads(sample.read_text(encoding="utf-8"))["Values"]
    assert {name for name in values if name.startswith("MAIL2BLOB_")} == SETTING_NAMES


def test_no_setting_flex_consumption_rejects() -> None:
    text = all_code()
    assert not [name for name in FLEX_REJECTS if re.search(rf"\b{name}\b", text)]
    assert re.search(r"runtime: \{\s*name: 'python'\s*version: pythonVersion\s*\}", text)
    assert "pythonVersion: '3.11'" in code(MAIN)


def test_host_uses_identity_based_connections() -> None:
    settings = dict(re.findall(r"\{ name: '(\w+)', value: (.+) \}", code(FUNCTION_APP)))
    assert settings["AzureWebJobsStorage__credential"] == "'managedidentity'"
    assert settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    assert settings["AZURE_CLIENT_ID"] == "identityClientId"
    for service in ("blob", "queue", "table"):
        value = settings[f"AzureWebJobsStorage__{service}ServiceUri"]
        assert value == f"storage.properties.primaryEndpoints.{service}"
    assert "Authorization=AAD" in settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in settings
    assert "AzureWebJobsStorage" not in settings  # no connection string form
    assert "identityClientId: identity.outputs.clientId" in code(MAIN)


def test_deployed_defaults_pass_the_code_validation() -> None:
    """Render the settings map with main.bicep's defaults (runtime values as plausible stand-ins)
    and feed it to the code's own validation."""
    defaults = params(MAIN)
    runtime = {
        "tenant().tenantId": "00000000-0000-0000-0000-000000000001",
        "registration.outputs.clientId": "00000000-0000-0000-0000-000000000002",
        "identity.outputs.clientId": "00000000-0000-0000-0000-000000000003",
        "authority": "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000001",
        "keyVault.outputs.uri": "https://kv-abc.vault.azure.net/",
        "storage.outputs.blobEndpoint": "https://stabc.blob.core.windows.net/",
        "redirectUri": "https://func-abc.azurewebsites.net/api/consent/callback",
        "mailbox": "invoices@contoso.com",
        "mail2blobAuthMode": _auth_mode_for(defaults["authMode"].strip("'")),
    }
    env: dict[str, str] = {}
    for name, expr in deployed_settings().items():
        if expr in runtime:
            env[name] = runtime[expr]
            continue
        inner = re.fullmatch(r"string\((\w+)\)", expr)
        default = defaults[inner.group(1) if inner else expr]
        assert default is not None, f"{name} comes from a required parameter without a stand-in"
        env[name] = default.strip("'")
    settings = Settings.from_env(env)
    assert settings.imap_port == 993 and settings.container == "mail"
    assert settings.fic_client_id and settings.client_secret is None


def _auth_mode_for(auth_mode_param: str) -> str:
    """What main.bicep's ``mail2blobAuthMode`` makes of its ``authMode`` parameter."""
    assert var(MAIN, "mail2blobAuthMode") == "authMode == 'appOnly' ? 'app' : 'delegated'"
    return "app" if auth_mode_param == "appOnly" else "delegated"


def test_auth_mode_parameter_maps_to_the_setting() -> None:
    allowed = re.search(
        r"@allowed\(\[\s*'delegated'\s*'appOnly'\s*'both'\s*\]\)\s*@description\([^\n]*\)\s*"
        r"param authMode",
        code(MAIN),
    )
    assert allowed, "authMode's allowed values changed"
    assert deployed_settings()["MAIL2BLOB_AUTH_MODE"] == "mail2blobAuthMode"
    for value in ("delegated", "appOnly", "both"):
        env = {
            "MAIL2BLOB_TENANT_ID": "t",
            "MAIL2BLOB_CLIENT_ID": "c",
            "MAIL2BLOB_FIC_CLIENT_ID": "mi",
            "MAIL2BLOB_KEY_VAULT_URL": "https://kv.vault.azure.net",
            "MAIL2BLOB_MAILBOX": "a@b.example",
            "MAIL2BLOB_STORAGE": "https://st.blob.core.windows.net",
            "MAIL2BLOB_AUTH_MODE": _auth_mode_for(value),
        }
        assert Settings.from_env(env).auth_mode == _auth_mode_for(value)


# --- consent: redirect URI and permissions --------------------------------------------------


def test_redirect_uri_is_the_consent_callback() -> None:
    callback = string_var(MAIN, "consentCallbackPath")
    assert callback.endswith("/api/consent/callback")
    assert string_var(MAIN, "consentPath") == "/api/consent"
    assert var(MAIN, "redirectUri") == "'https://${functionAppHost}${consentCallbackPath}'"
    # The host name is derived from the same name the Function App is created with.
    assert var(MAIN, "functionAppHost") == "'${names.functionApp}.azurewebsites.net'"
    assert "appName: names.functionApp" in code(MAIN)
    assert deployed_settings()["MAIL2BLOB_REDIRECT_URI"] == "redirectUri"
    assert re.search(r"^\s*redirectUri: redirectUri$", code(MAIN), re.MULTILINE)
    assert re.search(r"redirectUris: \[\s*redirectUri\s*\]", code(REGISTRATION))
    sample = ROOT / "local.settings.sample.json"
    if sample.is_file():
        values = json.loads(sample.read_text(encoding="utf-8"))["Values"]
        assert values["MAIL2BLOB_REDIRECT_URI"].endswith(callback)


def _http_routes() -> dict[str, str]:
    """Route path (with the host's prefix) -> auth level of every HTTP function of the app."""
    import function_app

    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    prefix = host.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    routes: dict[str, str] = {}
    for fn in function_app.app.get_functions():
        trigger = fn.get_trigger()
        if trigger.get_binding_name() == "httpTrigger":
            route = trigger.route or fn.get_function_name()
            path = "/" + "/".join(part for part in (prefix, route) if part)
            routes[path] = str(getattr(trigger.auth_level, "value", trigger.auth_level)).lower()
    return routes


def test_consent_routes_match_the_app() -> None:
    routes = _http_routes()
    if not routes:
        pytest.skip("the consent functions are not registered in function_app.py yet")
    callback = string_var(MAIN, "consentCallbackPath")
    start = string_var(MAIN, "consentPath")
    # The callback is the only anonymous route: Entra ID cannot send a function key, and a key's
    # ?code= would collide with OAuth's code. Starting consent needs the function key.
    assert {path for path, level in routes.items() if level == "anonymous"} == {callback}, routes
    assert routes.get(start) == "function", routes


def test_permissions_match_the_notes_and_the_code_scopes() -> None:
    assert string_var(REGISTRATION, "graphAppId") == GRAPH_APP_ID
    assert string_var(REGISTRATION, "exchangeAppId") == EXCHANGE_APP_ID
    entry = r"\{ value: '([\w.]+)', id: '([0-9a-f-]{36})' \}"
    delegated = dict(re.findall(entry, block(REGISTRATION, "var graphDelegatedScopes = [")))
    assert delegated == GRAPH_DELEGATED
    app_roles = dict(re.findall(entry, var(REGISTRATION, "exchangeAppRole")))
    assert app_roles == EXCHANGE_APP_ROLES

    # The delegated scope the code requests is one of them, on Exchange Online's host.
    resource, _, permission = IMAP_SCOPE.rpartition("/")
    assert resource == "https://outlook.office365.com" and permission in delegated
    # MSAL adds these three to every delegated request; without offline_access: AADSTS900144.
    assert {"openid", "profile", "offline_access"} <= delegated.keys()
    # App-only asks Exchange Online for .default, i.e. for its granted app roles.
    assert IMAP_APP_SCOPE == "https://outlook.office365.com/.default"

    text = code(REGISTRATION)
    loop = "[for permission in graphDelegatedScopes: { id: permission.id, type: 'Scope' }]"
    assert f"resourceAccess: {loop}" in text
    assert "{ id: exchangeAppRole.id, type: 'Role' }" in text
    access = "concat(delegated ? [graphAccess] : [], appOnly ? [exchangeAccess] : [])"
    assert f"requiredResourceAccess: {access}" in text
    # "both" (sources of either kind) asks for both permissions.
    assert "var delegated = authMode != 'appOnly'" in text
    assert "var appOnly = authMode != 'delegated'" in text
    # Admin consent grants exactly the requested scopes / role.
    assert "scope: join(map(graphDelegatedScopes, permission => permission.value), ' ')" in text
    assert "appRoleId: exchangeAppRole.id" in text


def test_app_registration_is_secretless() -> None:
    text = code(REGISTRATION)
    fic = block(
        REGISTRATION, "resource managedIdentityCredential 'federatedIdentityCredentials@v1.0' = {"
    )
    assert re.search(r"audiences: \[\s*'api://AzureADTokenExchange'\s*\]", fic)
    assert "subject: identityPrincipalId" in fic and "issuer: issuer" in fic
    assert "name: '${app.uniqueName}/" in fic
    assert "uniqueName: uniqueName" in text and "signInAudience: 'AzureADMyOrg'" in text
    assert "identityPrincipalId: identity.outputs.principalId" in code(MAIN)
    assert "issuer: '${authority}/v2.0'" in code(MAIN)
    assert deployed_settings()["MAIL2BLOB_FIC_CLIENT_ID"] == "identity.outputs.clientId"
    everything = all_code()
    for secret in (
        "passwordCredentials",
        "keyCredentials",
        "listKeys(",
        "AccountKey=",
        "clientSecret",
    ):
        assert secret not in everything, secret


# --- roles ----------------------------------------------------------------------------------


def _role_assignments() -> list[tuple[str, str, str]]:
    """(resource name, role key, scope expression) of every role assignment in rbac.bicep."""
    found = []
    for chunk in re.split(r"\n(?=resource )", code(RBAC)):
        header = re.match(r"resource (\w+) 'Microsoft\.Authorization/roleAssignments@", chunk)
        if not header:
            continue
        role = re.search(r"roleDefinitions', roles\.(\w+)\)", chunk)
        scope = re.search(r"^\s*scope: (\S+)$", chunk, re.MULTILINE)
        name = re.search(r"^\s*name: guid\((\S+), (\w+), roles\.(\w+)\)$", chunk, re.MULTILINE)
        assert role and scope and name, f"{header.group(1)}: role, scope or guid() name missing"
        # guid(scope.id, principal, role): idempotent and unique per scope/principal/role.
        assert name.group(1).removesuffix(".id") == scope.group(1), header.group(1)
        assert name.group(3) == role.group(1), header.group(1)
        found.append((header.group(1), role.group(1), scope.group(1)))
    return found


def test_role_definition_ids_match_the_notes() -> None:
    body = block(RBAC, "var roles = {")
    declared = dict(re.findall(r"^\s*(\w+): '([0-9a-f-]{36})'$", body, re.MULTILINE))
    assert declared == ROLE_IDS
    assert not re.findall(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        code(RBAC).replace(body, ""),
    )  # no role id outside the table


def test_roles_are_least_privilege() -> None:
    grants = {(role, scope) for _, role, scope in _role_assignments()}
    container = "storage::blobService::"
    assert grants == {
        ("storageBlobDataContributor", container + "archiveContainer"),
        ("storageBlobDataContributor", container + "deploymentContainer"),
        ("storageBlobDataOwner", container + "hostContainers[i]"),
        ("storageQueueDataContributor", "storage"),
        ("storageTableDataContributor", "storage"),
        ("keyVaultSecretsOfficer", "vault"),
        ("monitoringMetricsPublisher", "applicationInsights"),
        ("storageBlobDataReader", container + "archiveContainer"),
    }
    text = code(RBAC)
    assert text.count("principalType: 'ServicePrincipal'") == len(grants) - 1
    assert "principalType: readerPrincipalType" in text  # the optional human reader


# --- hardening ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            STORAGE,
            [
                "allowSharedKeyAccess: false",
                "allowBlobPublicAccess: false",
                "minimumTlsVersion: 'TLS1_2'",
                "supportsHttpsTrafficOnly: true",
                "defaultToOAuthAuthentication: true",
                "publicAccess: 'None'",
            ],
        ),
        (
            KEY_VAULT,
            [
                "enableRbacAuthorization: true",
                "enableSoftDelete: true",
                "enablePurgeProtection: true",
            ],
        ),
        (MONITORING, ["DisableLocalAuth: true", "disableLocalAuth: true"]),
        (
            FUNCTION_APP,
            [
                "name: 'FC1'",
                "tier: 'FlexConsumption'",
                "kind: 'functionapp,linux'",
                "type: 'UserAssigned'",
                "type: 'UserAssignedIdentity'",
                "httpsOnly: true",
                "minTlsVersion: '1.2'",
                "ftpsState: 'Disabled'",
            ],
        ),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)
def test_resource_hardening(path: Path, expected: list[str]) -> None:
    text = code(path)
    assert [line for line in expected if line not in text] == []


def test_checkov_skips_are_justified() -> None:
    """Each skip names one check and says why, in the form checkov reads (inside the resource)."""
    for path in bicep_files():
        ids = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if "checkov:skip" in line:
                match = re.fullmatch(r"\s*// checkov:skip=(CKV2?_[A-Z]+_\d+): (.{30,})", line)
                assert match, f"{path.name}: skip without an id and a reason: {line.strip()}"
                ids.append(match.group(1))
        assert len(ids) == len(set(ids)), f"{path.name}: a check is skipped twice"


# --- fan-out queues and the consent alert (many sources) ------------------------------------

ALERTS = INFRA / "core" / "monitor" / "alerts.bicep"


def _app_functions() -> dict:
    """Function name -> function of a freshly executed function_app.py (``get_functions()`` may
    be called only once per app object)."""
    import runpy

    app = runpy.run_path(str(ROOT / "function_app.py"))["app"]
    return {fn.get_function_name(): fn for fn in app.get_functions()}


def test_fan_out_queues_match_the_functions_host_json_and_infra() -> None:
    from mail2blob import fanout

    functions = _app_functions()
    bindings = {
        name: [b.get_dict_repr() for b in fn.get_bindings()] for name, fn in functions.items()
    }

    def queue_of(function: str, kind: str) -> dict:
        (found,) = [b for b in bindings[function] if b["type"] == kind]
        assert found["connection"] == "AzureWebJobsStorage"
        return found

    assert queue_of("drain_timer", "queue")["queueName"] == fanout.QUEUE_NAME
    assert queue_of("drain_queue", "queueTrigger")["queueName"] == fanout.QUEUE_NAME
    # Our poison records go where the host itself moves messages after maxDequeueCount.
    assert queue_of("drain_queue", "queue")["queueName"] == fanout.POISON_QUEUE_NAME
    assert fanout.POISON_QUEUE_NAME == fanout.QUEUE_NAME + "-poison"

    # The worker refuses to load a function whose annotations its converters reject (it knows
    # typing.List[str], not list[str], for a queue output of several messages).
    import typing

    from azure.functions.queue import QueueMessageInConverter, QueueMessageOutConverter

    user = {name: fn.get_user_function() for name, fn in functions.items()}
    timer_out = typing.get_type_hints(user["drain_timer"])["drains"]
    assert QueueMessageOutConverter.check_output_type_annotation(typing.get_args(timer_out)[0])
    queue_hints = typing.get_type_hints(user["drain_queue"])
    assert QueueMessageInConverter.check_input_type_annotation(queue_hints["msg"])
    poison_out = typing.get_args(queue_hints["poison"])[0]
    assert QueueMessageOutConverter.check_output_type_annotation(poison_out)

    names = re.findall(r"'([\w-]+)'", block(MAIN, "var drainQueueNames = ["))
    assert names == [fanout.QUEUE_NAME, fanout.POISON_QUEUE_NAME]
    assert "queueNames: drainQueueNames" in code(MAIN)
    assert "for queueName in queueNames" in code(STORAGE)

    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    queues = host["extensions"]["queues"]
    assert queues["maxDequeueCount"] == 3 == fanout.max_dequeue_count(ROOT / "host.json")
    assert queues["messageEncoding"] == "base64"
    # At most this many drains run at once on one instance (memory: ~40 MB each).
    assert queues["batchSize"] + queues["newBatchThreshold"] <= 8
    assert params(MAIN)["maximumInstanceCount"] == "40"


def test_consent_alert_matches_the_logged_event(caplog: pytest.LogCaptureFixture) -> None:
    from mail2blob import fanout
    from mail2blob.sources import Source

    query = string_var(ALERTS, "consentQuery")
    assert query.startswith(f'traces | where message startswith "{fanout.CONSENT_EVENT}"')
    # The dimensions the rule splits on are extracted the way the engine writes the line.
    with caplog.at_level("ERROR", logger="mail2blob.fanout"):
        fanout.log_consent_failure(Source("invoices", "invoices@contoso.com"), "AADSTS50173")
    (line,) = [r.getMessage() for r in caplog.records]
    for name, value in (("source", "invoices"), ("aadsts", "AADSTS50173")):
        pattern = re.search(rf'extract\("({name}=[^"]+)", 1, message\)', query).group(1)
        assert re.search(pattern, line).group(1) == value

    alerts = code(ALERTS)
    assert "emailAddress: alertEmail" in alerts
    assert re.search(r"actionGroups: \[\s*actionGroup\.id\s*\]", alerts)
    assert re.search(r"scopes: \[\s*applicationInsightsId\s*\]", alerts)
    assert "muteActionsDuration: muteActionsDuration" in alerts and "autoMitigate: false" in alerts
    # No e-mail address, no action group and no rule.
    assert params(MAIN)["alertEmail"] == "''"
    assert "module alerts 'core/monitor/alerts.bicep' = if (!empty(alertEmail)) {" in code(MAIN)
    assert "applicationInsightsId: monitoring.outputs.applicationInsightsId" in code(MAIN)
    # Adaptive sampling must never drop the event the alert looks for.
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    sampling = host["logging"]["applicationInsights"]["samplingSettings"]
    assert "Trace" in sampling["excludedTypes"].split(";")
