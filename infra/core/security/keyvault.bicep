// Key Vault holding the MSAL token cache (the delegated refresh token) as one secret. RBAC only:
// no access policies; the Function App identity gets Key Vault Secrets Officer on this vault.

@description('Key Vault name (3-24 letters, digits and dashes).')
@minLength(3)
@maxLength(24)
param name string

param location string = resourceGroup().location
param tags object = {}

@description('Days a deleted vault or secret stays recoverable; purge protection keeps the name reserved that long.')
@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int = 90

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    // checkov:skip=CKV_AZURE_109: Flex Consumption without a virtual network has no fixed outbound addresses to allow-list; access is Entra ID RBAC on this vault only.
    // checkov:skip=CKV_AZURE_189: same reason: the public endpoint stays enabled; nothing is readable without an RBAC role on this vault.
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
