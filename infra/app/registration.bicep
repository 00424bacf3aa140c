// The Entra ID app registration mail2blob signs in with, made by the Microsoft Graph Bicep
// extension. No client secret exists: a federated identity credential trusts the Function App's
// user-assigned managed identity, whose token for api://AzureADTokenExchange is the client
// assertion (MAIL2BLOB_FIC_CLIENT_ID).
extension microsoftGraphV1

@description('Immutable unique name of the app registration (the idempotency key in Entra ID).')
param uniqueName string

param displayName string

@description('Web redirect URI: https://<function app host>/api/consent/callback.')
param redirectUri string

@description('Principal (object) id of the managed identity the federated credential trusts.')
param identityPrincipalId string

@description('Issuer of the managed identity tokens: <login endpoint><tenant id>/v2.0.')
param issuer string

@allowed([
  'delegated'
  'appOnly'
  'both'
])
@description('delegated: a user consents once to IMAP.AccessAsUser.All; appOnly: IMAP.AccessAsApp, no user; both: sources of either kind (.mail2blob/sources.json).')
param authMode string = 'delegated'

@description('Grant tenant-wide admin consent now (the deployer needs Cloud Application Administrator or Application Administrator).')
param grantAdminConsent bool = false

// Well-known application ids of the resource APIs.
var graphAppId = '00000003-0000-0000-c000-000000000000' // Microsoft Graph
var exchangeAppId = '00000002-0000-0ff1-ce00-000000000000' // Office 365 Exchange Online

// Delegated permissions on Microsoft Graph. The IMAP scope the code asks for at run time is
// https://outlook.office365.com/IMAP.AccessAsUser.All; in the registration it is listed under Graph.
var graphDelegatedScopes = [
  { value: 'IMAP.AccessAsUser.All', id: '652390e4-393a-48de-9484-05f9b1212954' }
  { value: 'offline_access', id: '7427e0e9-2fba-42fe-b0c0-848c9e6a8182' }
  { value: 'openid', id: '37f7f235-527c-4136-accd-4a02d197296e' }
  { value: 'profile', id: '14dad69e-099b-42c9-810b-d002981feec1' }
]

// Application permission (app role) on Office 365 Exchange Online for app-only IMAP
// (token scope https://outlook.office365.com/.default).
var exchangeAppRole = { value: 'IMAP.AccessAsApp', id: '5e5addcd-3e8d-4e90-baf5-964efab2b20a' }

var delegated = authMode != 'appOnly'
var appOnly = authMode != 'delegated'

var graphAccess = {
  resourceAppId: graphAppId
  resourceAccess: [for permission in graphDelegatedScopes: { id: permission.id, type: 'Scope' }]
}
var exchangeAccess = {
  resourceAppId: exchangeAppId
  resourceAccess: [
    { id: exchangeAppRole.id, type: 'Role' }
  ]
}

resource app 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMyOrg'
  web: {
    redirectUris: [
      redirectUri
    ]
    implicitGrantSettings: {
      enableAccessTokenIssuance: false
      enableIdTokenIssuance: false
    }
  }
  requiredResourceAccess: concat(delegated ? [graphAccess] : [], appOnly ? [exchangeAccess] : [])

  resource managedIdentityCredential 'federatedIdentityCredentials@v1.0' = {
    name: '${app.uniqueName}/function-app-managed-identity'
    description: 'The mail2blob Function App\'s user-assigned managed identity; replaces a client secret.'
    audiences: [
      'api://AzureADTokenExchange'
    ]
    issuer: issuer
    subject: identityPrincipalId
  }
}

// The enterprise application: consent grants and Exchange's New-ServicePrincipal refer to it.
resource servicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: app.appId
}

resource graphServicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' existing = if (grantAdminConsent && delegated) {
  appId: graphAppId
}

resource exchangeServicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' existing = if (grantAdminConsent && appOnly) {
  appId: exchangeAppId
}

// Tenant-wide admin consent for the delegated scopes (what the portal's "Grant admin consent" does).
resource delegatedGrant 'Microsoft.Graph/oauth2PermissionGrants@v1.0' = if (grantAdminConsent && delegated) {
  clientId: servicePrincipal.id
  consentType: 'AllPrincipals'
  resourceId: graphServicePrincipal.id
  scope: join(map(graphDelegatedScopes, permission => permission.value), ' ')
}

// Admin consent for the app-only role: assign IMAP.AccessAsApp to this app's service principal.
resource appRoleGrant 'Microsoft.Graph/appRoleAssignedTo@v1.0' = if (grantAdminConsent && appOnly) {
  appRoleId: exchangeAppRole.id
  principalId: servicePrincipal.id
  resourceId: exchangeServicePrincipal.id
}

output clientId string = app.appId
output applicationObjectId string = app.id
output servicePrincipalId string = servicePrincipal.id
