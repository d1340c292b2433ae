// The rebalancer's own resources, in its resource group: identity, storage, monitoring,
// the Flex Consumption function app, the subscription's Event Grid system topic and the
// optional notification topic. Nothing here uses a key or a connection string with a secret.
targetScope = 'resourceGroup'

param location string
param tags object
param namePrefix string
param resourceToken string
param managedResourceGroups array
param mode string
param defaultOptIn string
param timerSchedule string
param maxSurge int
param cooldownMinutes int
param healthTimeoutMinutes int
param minMoveIntervalMinutes int
param maxConcurrentOperations int
param auditIntervalMinutes int
param historyRetentionDays int
param armBudgetShare string
param deployNotificationTopic bool
param maximumInstanceCount int
param instanceMemoryMB int
param zoneRedundant bool

var functionAppName = '${namePrefix}-func-${resourceToken}'
var deploymentContainerName = 'app-package-${take(resourceToken, 12)}'
var deadLetterContainerName = 'eventgrid-deadletter'
var followUpQueueName = 'rebalancer-follow-ups'
// Each function scales on its own instances (Flex Consumption's per-function scaling): a
// zone-redundant plan needs two always-ready instances of each, in two zones.
var functionNames = [
  'on_resource_event' // rebalancer.azure_operations.EVENT_GRID_FUNCTION_NAME
  'on_timer'
  'on_follow_up'
]
var alwaysReady = [for name in functionNames: {
  name: 'function:${name}'
  instanceCount: 2
}]

// Built-in roles (ids are the same in every tenant).
var storageBlobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
var storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'
var eventGridDataSender = 'd5a91429-5739-47e2-a06b-3470a27159e7'

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${namePrefix}-id-${resourceToken}'
  location: location
  tags: tags
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:Flex Consumption without VNet integration reaches its storage over the public endpoint; access needs Entra ID (shared keys are off).
  // checkov:skip=CKV_AZURE_59:Same as CKV_AZURE_35: without a VNet the host and Event Grid dead-lettering need the public endpoint; every request is authorised by Entra ID.
  // checkov:skip=CKV_AZURE_206:ZRS with zoneRedundant; otherwise LRS: the account holds only the app package, host locks and the rebalancer state, all rebuilt by a redeploy and the next audit.
  // checkov:skip=CKV_AZURE_43:The name is an expression checkov cannot evaluate: the prefix and a uniqueString token, lowercase letters and digits, at most 24.
  name: take('${toLower(replace(namePrefix, '-', ''))}st${resourceToken}', 24)
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: zoneRedundant ? 'Standard_ZRS' : 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobServices 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource queueServices 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

// In-flight operations' follow-ups: each message is a durable timer (sent with a visibility
// delay) that the on_follow_up queue trigger receives when the operation's next change is due.
resource followUpQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueServices
  name: followUpQueueName
}

// Flex Consumption reads the app package from here, with the app's identity.
resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobServices
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Event Grid puts events here that it could not deliver in a day of retries.
resource deadLetterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobServices
  name: deadLetterContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${namePrefix}-log-${resourceToken}'
  location: location
  tags: tags
  properties: {
    retentionInDays: 30
    sku: {
      name: 'PerGB2018'
    }
    features: {
      disableLocalAuth: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${namePrefix}-appi-${resourceToken}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
  }
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy is the zoneRedundant parameter, off by default: it keeps two always-ready instances per function, billed while idle, and a missed timer run is caught up by the next one.
  name: '${namePrefix}-plan-${resourceToken}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:Event Grid delivers to the app over its public endpoint; the Event Grid trigger checks the system key, and nothing else is exposed (no HTTP functions).
  // checkov:skip=CKV_AZURE_17:Client certificates would reject Event Grid deliveries, which do not present one.
  // checkov:skip=CKV_AZURE_212:Flex Consumption scales from zero by itself; state lives in Table Storage and a missed timer run is caught up by the next one.
  // checkov:skip=CKV_AZURE_213:The app has no HTTP endpoint to probe (timer and Event Grid triggers only); Flex Consumption manages instance health itself.
  name: functionAppName
  location: location
  tags: union(tags, {
    'azd-service-name': 'rebalancer'
  })
  kind: 'functionapp,linux'
  // The deployment storage below names the container by its name, not by the resource: without
  // this, Resource Manager may create the app before the container it reads its package from.
  dependsOn: [
    deploymentContainer
  ]
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      // Every setting the app reads (docs/deploy.md), identity-based: no keys, no secrets.
      appSettings: [
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: storage.properties.primaryEndpoints.blob
        }
        {
          name: 'AzureWebJobsStorage__queueServiceUri'
          value: storage.properties.primaryEndpoints.queue
        }
        {
          name: 'AzureWebJobsStorage__tableServiceUri'
          value: storage.properties.primaryEndpoints.table
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identity.properties.clientId
        }
        {
          name: 'AZURE_CLIENT_ID'
          value: identity.properties.clientId
        }
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsights.properties.ConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${identity.properties.clientId};Authorization=AAD'
        }
        {
          name: 'REBALANCER_MODE'
          value: mode
        }
        {
          name: 'REBALANCER_SUBSCRIPTION_ID'
          value: subscription().subscriptionId
        }
        {
          name: 'REBALANCER_RESOURCE_GROUPS'
          value: join(managedResourceGroups, ',')
        }
        {
          name: 'REBALANCER_DEFAULT_OPT_IN'
          value: defaultOptIn
        }
        {
          name: 'REBALANCER_MAX_SURGE'
          value: string(maxSurge)
        }
        {
          name: 'REBALANCER_COOLDOWN_MINUTES'
          value: string(cooldownMinutes)
        }
        {
          name: 'REBALANCER_HEALTH_TIMEOUT_MINUTES'
          value: string(healthTimeoutMinutes)
        }
        {
          name: 'REBALANCER_MIN_MOVE_INTERVAL_MINUTES'
          value: string(minMoveIntervalMinutes)
        }
        {
          name: 'REBALANCER_MAX_CONCURRENT_OPERATIONS'
          value: string(maxConcurrentOperations)
        }
        {
          name: 'REBALANCER_TIMER_SCHEDULE'
          value: timerSchedule
        }
        {
          name: 'REBALANCER_AUDIT_INTERVAL_MINUTES'
          value: string(auditIntervalMinutes)
        }
        {
          name: 'REBALANCER_HISTORY_RETENTION_DAYS'
          value: string(historyRetentionDays)
        }
        {
          // The cloud's own Resource Manager endpoint (sovereign clouds included).
          name: 'REBALANCER_ARM_ENDPOINT'
          value: environment().resourceManager
        }
        {
          name: 'REBALANCER_APP_PRINCIPAL_ID'
          value: identity.properties.principalId
        }
        {
          name: 'REBALANCER_STATE_TABLE_PREFIX'
          value: 'rebalancer'
        }
        {
          name: 'REBALANCER_NOTIFY_TOPIC_ENDPOINT'
          value: deployNotificationTopic ? notificationTopic.properties.endpoint : ''
        }
        {
          name: 'REBALANCER_ARM_BUDGET_SHARE'
          value: armBudgetShare
        }
        {
          name: 'REBALANCER_FOLLOW_UP_QUEUE'
          value: followUpQueue.name
        }
        {
          name: 'REBALANCER_FOLLOW_UP_SECONDS'
          value: '10'
        }
        {
          name: 'REBALANCER_SDK_LOG_LEVEL'
          value: 'WARNING'
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: zoneRedundant ? alwaysReady : []
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// Deployments authenticate with Entra ID; no FTP or SCM basic-auth credentials exist.
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

// The host (AzureWebJobsStorage: blob leases, package, queues) and the rebalancer's state tables.
resource identityBlobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwner)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource identityQueueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource identityTableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Identity-based telemetry ingestion (local auth is disabled on the component).
resource identityMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, identity.id, monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Resource events of the whole subscription. Only one system topic may exist per source: see
// docs/deploy.md if the subscription already has one.
resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: '${namePrefix}-evgt-${resourceToken}'
  location: 'global'
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: subscription().id
    topicType: 'Microsoft.Resources.Subscriptions'
  }
}

// The system topic dead-letters undeliverable events with its own identity (no account key),
// and only into the dead-letter container.
resource systemTopicDeadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetterContainer.id, systemTopic.id, storageBlobDataContributor)
  scope: deadLetterContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource notificationTopic 'Microsoft.EventGrid/topics@2022-06-15' = if (deployNotificationTopic) {
  // checkov:skip=CKV_AZURE_191:The topic only receives events; it delivers nothing, so it needs no identity of its own.
  // checkov:skip=CKV_AZURE_192:checkov reads a conditional resource one level too shallow and misses disableLocalAuth: true below; tests/test_infra.py asserts it.
  // checkov:skip=CKV_AZURE_193:Subscribers of the notifications are outside any VNet; publishing needs Entra ID (local auth is off).
  name: '${namePrefix}-evgt-notify-${resourceToken}'
  location: location
  tags: tags
  properties: {
    inputSchema: 'CloudEventSchemaV1_0' // the app publishes CloudEvents 1.0 (rebalancer/notify.py)
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

resource identityNotificationSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (deployNotificationTopic) {
  name: guid(notificationTopic.id, identity.id, eventGridDataSender)
  scope: notificationTopic
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', eventGridDataSender)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

output identityPrincipalId string = identity.properties.principalId
output identityClientId string = identity.properties.clientId
output functionAppName string = functionApp.name
output storageAccountName string = storage.name
output appInsightsName string = appInsights.name
output systemTopicName string = systemTopic.name
output deadLetterContainerName string = deadLetterContainerName
