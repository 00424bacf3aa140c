// mail2blob: everything one `azd up` (or `az deployment sub create`) needs, the Entra ID app
// registration included. Subscription scope: it creates the resource group, then one module per
// concern. Every resource name derives from resourceToken and can be overridden.
targetScope = 'subscription'

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('Name of the environment (azd: AZURE_ENV_NAME); seeds every generated resource name.')
param environmentName string

@minLength(1)
@description('Azure region of every resource; it must offer Flex Consumption.')
@metadata({ azd: { type: 'location' } })
param location string

@description('Object id of a user or group that may read the archived mail (azd: the signed-in user). Empty: nobody.')
param principalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param principalType string = 'User'

// ---------------------------------------------------------------------------------------------
// What mail2blob drains and how (the MAIL2BLOB_* app settings)
// ---------------------------------------------------------------------------------------------

@description('Address of the mailbox to drain, e.g. invoices@contoso.com (azd: MAIL2BLOB_MAILBOX).')
@minLength(3)
param mailbox string

@allowed([
  'delegated'
  'appOnly'
  'both'
])
@description('delegated: a user consents once (IMAP.AccessAsUser.All on Microsoft Graph). appOnly: IMAP.AccessAsApp on Office 365 Exchange Online, admin consent and two Exchange Online PowerShell commands. both: the app registration gets both permissions, for sources of either kind in .mail2blob/sources.json; MAIL2BLOB_MAILBOX is then drained delegated (azd: ENTRA_AUTH_MODE).')
param authMode string = 'delegated'

@description('Grant tenant-wide admin consent during the deployment; the deployer needs Cloud Application Administrator or Application Administrator in Entra ID (azd: ENTRA_GRANT_ADMIN_CONSENT).')
param grantAdminConsent bool = false

@description('IMAP server (implicit TLS).')
param imapHost string = 'outlook.office365.com'

@minValue(1)
@maxValue(65535)
param imapPort int = 993

@description('Comma-separated IMAP folders to drain.')
param folders string = 'INBOX'

@description('Blob container of the archive; mail2blob keeps its own state under .mail2blob/ in it.')
@minLength(3)
@maxLength(63)
param archiveContainerName string = 'mail'

@description('What happens to a message once archived: keep, seen, move:<folder> or delete.')
param afterArchive string = 'keep'

@description('Six-field NCRONTAB schedule of the drain (sec min hour day month weekday), in UTC.')
param schedule string = '0 */5 * * * *'

@description('Seconds one drain may run before it checkpoints and stops (below the 30 min functionTimeout).')
@minValue(60)
@maxValue(1740)
param timeBudgetSeconds int = 1200

@description('Name of the Key Vault secret holding the MSAL token cache.')
param tokenSecretName string = 'mail2blob-token-cache'

// ---------------------------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------------------------

@description('E-mail address alerted when a source needs consent again (MAIL2BLOB_CONSENT_FAILED in the logs). Empty: no action group and no alert rule (azd: MAIL2BLOB_ALERT_EMAIL).')
param alertEmail string = ''

// ---------------------------------------------------------------------------------------------
// Sizing
// ---------------------------------------------------------------------------------------------

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
  'Standard_RAGRS'
  'Standard_RAGZRS'
])
param storageSkuName string = 'Standard_GRS'

@minValue(7)
@maxValue(90)
param keyVaultSoftDeleteRetentionDays int = 90

@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

// ---------------------------------------------------------------------------------------------
// Name overrides (empty: generated)
// ---------------------------------------------------------------------------------------------

param resourceGroupName string = ''
param identityName string = ''
param storageAccountName string = ''
param keyVaultName string = ''
param logAnalyticsName string = ''
param applicationInsightsName string = ''
param appServicePlanName string = ''
param functionAppName string = ''
param appRegistrationUniqueName string = ''
param appRegistrationDisplayName string = ''
param actionGroupName string = ''
param consentAlertName string = ''

// ---------------------------------------------------------------------------------------------
// Names and constants
// ---------------------------------------------------------------------------------------------

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }

// azure.yaml's service name: azd finds the app to deploy to by this tag.
var serviceName = 'mail2blob'

var names = {
  resourceGroup: !empty(resourceGroupName) ? resourceGroupName : '${abbrs.resourcesResourceGroups}${environmentName}'
  identity: !empty(identityName) ? identityName : '${abbrs.managedIdentityUserAssignedIdentities}${resourceToken}'
  storage: !empty(storageAccountName) ? storageAccountName : '${abbrs.storageStorageAccounts}${resourceToken}'
  keyVault: !empty(keyVaultName) ? keyVaultName : '${abbrs.keyVaultVaults}${resourceToken}'
  logAnalytics: !empty(logAnalyticsName) ? logAnalyticsName : '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
  applicationInsights: !empty(applicationInsightsName) ? applicationInsightsName : '${abbrs.insightsComponents}${resourceToken}'
  plan: !empty(appServicePlanName) ? appServicePlanName : '${abbrs.webServerFarms}${resourceToken}'
  functionApp: !empty(functionAppName) ? functionAppName : '${abbrs.webSitesFunctions}${resourceToken}'
  appUniqueName: !empty(appRegistrationUniqueName) ? appRegistrationUniqueName : 'mail2blob-${resourceToken}'
  appDisplayName: !empty(appRegistrationDisplayName) ? appRegistrationDisplayName : 'mail2blob (${environmentName})'
  actionGroup: !empty(actionGroupName) ? actionGroupName : '${abbrs.insightsActionGroups}${resourceToken}'
  consentAlert: !empty(consentAlertName) ? consentAlertName : '${abbrs.insightsScheduledQueryRules}consent-${resourceToken}'
}

// Flex Consumption deploys the app package from this container; the host keeps leases, timer
// state and function keys in the other two.
var deploymentContainerName = 'app-package'
var hostContainerNames = [
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]

// The fan-out: the timer puts one message per source on mail2blob-drain, a queue-triggered
// function drains each; failed messages end in mail2blob-drain-poison with the reason.
var drainQueueNames = [
  'mail2blob-drain'
  'mail2blob-drain-poison'
]

// Routes the consent functions serve (host.json keeps the default "api" route prefix).
var consentPath = '/api/consent'
var consentCallbackPath = '/api/consent/callback'

// The app registration needs the redirect URI and the app needs the registration's client id, so
// the host name is derived from the app name rather than read back from the app. The Graph Bicep
// extension only works in Azure public cloud, whose Functions domain is azurewebsites.net.
var functionAppHost = '${names.functionApp}.azurewebsites.net'
var redirectUri = 'https://${functionAppHost}${consentCallbackPath}'

// environment().authentication.loginEndpoint is "https://login.microsoftonline.com/" in Azure
// public cloud; the authority must not end with a slash, the FIC issuer ends with /v2.0.
var loginEndpoint = environment().authentication.loginEndpoint
var loginBase = endsWith(loginEndpoint, '/') ? loginEndpoint : '${loginEndpoint}/'
var authority = '${loginBase}${tenant().tenantId}'

// ---------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: names.resourceGroup
  location: location
  tags: tags
}

module identity 'core/security/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: names.identity
    location: location
    tags: tags
  }
}

module storage 'core/storage/storage-account.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: names.storage
    location: location
    tags: tags
    skuName: storageSkuName
    containerNames: concat([archiveContainerName, deploymentContainerName], hostContainerNames)
    queueNames: drainQueueNames
  }
}

module keyVault 'core/security/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: names.keyVault
    location: location
    tags: tags
    softDeleteRetentionInDays: keyVaultSoftDeleteRetentionDays
  }
}

module monitoring 'core/monitor/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: names.logAnalytics
    applicationInsightsName: names.applicationInsights
    location: location
    tags: tags
    retentionInDays: logRetentionDays
  }
}

module alerts 'core/monitor/alerts.bicep' = if (!empty(alertEmail)) {
  name: 'alerts'
  scope: rg
  params: {
    actionGroupName: names.actionGroup
    alertRuleName: names.consentAlert
    location: location
    tags: tags
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    alertEmail: alertEmail
  }
}

module registration 'app/registration.bicep' = {
  name: 'app-registration'
  scope: rg
  params: {
    uniqueName: names.appUniqueName
    displayName: names.appDisplayName
    redirectUri: redirectUri
    identityPrincipalId: identity.outputs.principalId
    issuer: '${authority}/v2.0'
    authMode: authMode
    grantAdminConsent: grantAdminConsent
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'role-assignments'
  scope: rg
  params: {
    identityPrincipalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    archiveContainerName: archiveContainerName
    deploymentContainerName: deploymentContainerName
    hostContainerNames: hostContainerNames
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    readerPrincipalId: principalId
    readerPrincipalType: principalType
  }
}

// The one-source case (no .mail2blob/sources.json) drains MAIL2BLOB_MAILBOX in this mode.
var mail2blobAuthMode = authMode == 'appOnly' ? 'app' : 'delegated'

// Exactly the settings mail2blob/settings.py reads (tests/test_infra.py keeps them in step).
// MAIL2BLOB_CLIENT_SECRET is never set (the federated credential replaces it) and neither is
// MAIL2BLOB_CA_BUNDLE (Azure's endpoints chain to public roots).
var mail2blobSettings = {
  MAIL2BLOB_TENANT_ID: tenant().tenantId
  MAIL2BLOB_CLIENT_ID: registration.outputs.clientId
  MAIL2BLOB_FIC_CLIENT_ID: identity.outputs.clientId
  MAIL2BLOB_AUTHORITY: authority
  MAIL2BLOB_KEY_VAULT_URL: keyVault.outputs.uri
  MAIL2BLOB_TOKEN_SECRET: tokenSecretName
  MAIL2BLOB_MAILBOX: mailbox
  MAIL2BLOB_IMAP_HOST: imapHost
  MAIL2BLOB_IMAP_PORT: string(imapPort)
  MAIL2BLOB_FOLDERS: folders
  MAIL2BLOB_STORAGE: storage.outputs.blobEndpoint
  MAIL2BLOB_CONTAINER: archiveContainerName
  MAIL2BLOB_AFTER: afterArchive
  MAIL2BLOB_SCHEDULE: schedule
  MAIL2BLOB_TIME_BUDGET: string(timeBudgetSeconds)
  MAIL2BLOB_REDIRECT_URI: redirectUri
  MAIL2BLOB_AUTH_MODE: mail2blobAuthMode
}

module functionApp 'core/host/functions-flex.bicep' = {
  name: 'function-app'
  scope: rg
  params: {
    planName: names.plan
    appName: names.functionApp
    location: location
    tags: union(tags, { 'azd-service-name': serviceName })
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    pythonVersion: '3.11'
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    appSettings: mail2blobSettings
  }
  // The host starts as soon as the app exists: let its roles exist first.
  dependsOn: [
    rbac
  ]
}

// ---------------------------------------------------------------------------------------------
// Outputs (azd stores them in .azure/<env>/.env)
// ---------------------------------------------------------------------------------------------

var keyCommand = 'az functionapp keys list -g ${rg.name} -n ${functionApp.outputs.name} --query functionKeys.default -o tsv'

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = 'https://${functionAppHost}'
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_URL string = keyVault.outputs.uri
output AZURE_MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output ENTRA_APP_CLIENT_ID string = registration.outputs.clientId
output ENTRA_APP_OBJECT_ID string = registration.outputs.applicationObjectId
output ENTRA_SERVICE_PRINCIPAL_ID string = registration.outputs.servicePrincipalId
output ENTRA_AUTH_MODE string = authMode
output REDIRECT_URI string = redirectUri
output ARCHIVE_CONTAINER_URL string = '${storage.outputs.blobEndpoint}${archiveContainerName}'
// The consent link needs the app's function key (?code=...), which only exists once the app has
// started: CONSENT_URL_COMMAND prints the whole link.
output CONSENT_URL string = 'https://${functionAppHost}${consentPath}'
output CONSENT_URL_COMMAND string = 'echo "https://${functionAppHost}${consentPath}?code=$(${keyCommand})"'
output STATUS_URL string = 'https://${functionAppHost}/api/status'
output ADMIN_CONSENT_COMMAND string = 'az ad app permission admin-consent --id ${registration.outputs.clientId}'
