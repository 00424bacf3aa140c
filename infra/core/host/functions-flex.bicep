// Flex Consumption plan + Linux Function App (Python) running as a user-assigned identity, with
// identity-based host storage and Entra ID-authenticated telemetry. Flex Consumption rejects the
// runtime, version and package settings older plans use: the runtime lives in functionAppConfig.

param planName string
param appName string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity.')
param identityClientId string

@description('Storage account of the host (AzureWebJobsStorage) and of the deployment container.')
param storageAccountName string

@description('Container Flex Consumption deploys the app package from.')
param deploymentContainerName string

param applicationInsightsName string

@description('The application\'s own settings, as name: value.')
param appSettings object = {}

@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

var hostSettings = [
  // DefaultAzureCredential (Key Vault, Blob) picks the user-assigned identity by this client id.
  { name: 'AZURE_CLIENT_ID', value: identityClientId }
  // Host storage over Entra ID: no connection string, no account key.
  { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
  { name: 'AzureWebJobsStorage__clientId', value: identityClientId }
  { name: 'AzureWebJobsStorage__blobServiceUri', value: storage.properties.primaryEndpoints.blob }
  { name: 'AzureWebJobsStorage__queueServiceUri', value: storage.properties.primaryEndpoints.queue }
  { name: 'AzureWebJobsStorage__tableServiceUri', value: storage.properties.primaryEndpoints.table }
  // Telemetry authenticated with the identity (the component has local auth disabled).
  { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: applicationInsights.properties.ConnectionString }
  { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${identityClientId};Authorization=AAD' }
]

var appSettingList = [for setting in items(appSettings): { name: setting.key, value: setting.value }]

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    // checkov:skip=CKV_AZURE_225: zone redundancy on Flex keeps at least two always-ready instances billed around the clock; a zone outage only delays a drain that resumes from its checkpoint.
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    // checkov:skip=CKV_AZURE_17: Entra ID redirects the browser to the consent callback, and a browser cannot present a client certificate there; the timer needs no inbound traffic.
    // checkov:skip=CKV_AZURE_222: the consent pages must be reachable by the mailbox user's browser; /api/consent needs a function key, the callback is protected by the OAuth state.
    // checkov:skip=CKV_AZURE_212: scale to zero is the point of Flex Consumption (nothing runs, nothing is billed at rest); a missed tick is caught up by the next one.
    // checkov:skip=CKV_AZURE_213: Flex Consumption does not support the platform health check; failed runs surface in Application Insights.
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: concat(hostSettings, appSettingList)
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

output id string = functionApp.id
output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
