// The alert on a dead or failing consent: mail2blob logs one line starting with
// MAIL2BLOB_CONSENT_FAILED (then source=, mailbox=, aadsts=, auth=) whenever a source needs
// consent again; Functions sends it to Application Insights `traces` with that text as `message`.
// A scheduled query rule finds it (one alert per source) and an action group sends the e-mail.
// Deployed only with an alert e-mail address.

param actionGroupName string
param alertRuleName string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the Application Insights component the Function App logs to.')
param applicationInsightsId string

@description('Who gets the e-mail.')
param alertEmail string

@description('How often the rule looks, and over how long a window.')
param evaluationFrequency string = 'PT15M'

@description('After an alert, no further e-mail for the same source for this long (a dead consent logs on every tick).')
param muteActionsDuration string = 'PT24H'

// One row per failing source: the alert is split by the source dimension.
var consentQuery = 'traces | where message startswith "MAIL2BLOB_CONSENT_FAILED" | extend source = extract("source=([^ ]+)", 1, message), aadsts = extract("aadsts=([^ ]+)", 1, message) | summarize failures = count() by source, aadsts'

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: actionGroupName
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'mail2blob'
    enabled: true
    emailReceivers: [
      {
        name: 'mail2blob-admin'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

resource consentAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: alertRuleName
  location: location
  tags: tags
  properties: {
    displayName: 'mail2blob: consent needed'
    description: 'A mail2blob source cannot get a token any more (MAIL2BLOB_CONSENT_FAILED): open the consent link again for it. The status page (/api/status) names the source and the AADSTS reason.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: evaluationFrequency
    windowSize: evaluationFrequency
    criteria: {
      allOf: [
        {
          query: consentQuery
          timeAggregation: 'Total'
          metricMeasureColumn: 'failures'
          dimensions: [
            {
              name: 'source'
              operator: 'Include'
              values: [
                '*'
              ]
            }
            {
              name: 'aadsts'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    muteActionsDuration: muteActionsDuration
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output actionGroupId string = actionGroup.id
output alertRuleId string = consentAlert.id
