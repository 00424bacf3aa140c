"""Names shared by every part of the local stack (identity, Dovecot, Key Vault, devstack)."""

TENANT_ID = "72f988bf-0000-4000-8000-00000000cafe"
CLIENT_ID = "5e3ce6c0-2b1f-4285-8d4b-75ee78787346"
CLIENT_SECRET = "devstack-client-secret-Q7~not-a-real-one"
# A second, public client (device code / localhost flows without a secret).
PUBLIC_CLIENT_ID = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
# The managed identity whose token is the federated client assertion (and reads Key Vault).
MI_CLIENT_ID = "9d7c6b5a-1111-4222-8333-944455556666"
MI_PRINCIPAL_ID = "3f2e1d0c-aaaa-4bbb-8ccc-ddddeeeeffff"

MAILBOX = "archive@contoso.example"
OTHER_USER = "mallory@contoso.example"
SHARED_MAILBOX = "shared@contoso.example"
USERS = {
    MAILBOX: "11111111-1111-4111-8111-111111111111",
    OTHER_USER: "22222222-2222-4222-8222-222222222222",
}

# Audience and issuer of Exchange Online access tokens (v1 tokens: iss is sts.windows.net).
OUTLOOK_AUDIENCE = "https://outlook.office.com"
OUTLOOK_ISSUER = f"https://sts.windows.net/{TENANT_ID}/"
IMAP_SCOPE = "https://outlook.office365.com/IMAP.AccessAsUser.All"
VAULT_RESOURCE = "https://vault.azure.net"

SEED_MASTER_USER = "seeder"
SEED_MASTER_PASSWORD = "devstack-seed-password"
