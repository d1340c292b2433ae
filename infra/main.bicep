// VMSS zone rebalancer: one deployment per subscription, provisioned by `azd up`.
// The subscription-scope parts (resource group, custom roles and their assignments) live here;
// the app's resources are in modules/app.bicep. The Event Grid event subscription is deployed
// after the code by infra/hooks/postdeploy.sh from event-subscription.bicep, because Event Grid
// checks that the target function exists when the subscription is created.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; it seeds the unique names of all resources.')
param environmentName string

@minLength(1)
@description('Region of the resource group and the app (a region that offers Flex Consumption).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@minLength(2)
@maxLength(6)
@description('Short lowercase prefix of resource names.')
param namePrefix string = 'zr'

@description('Resource group for the app. Empty: rg-<environmentName>.')
param resourceGroupName string = ''

@description('Comma-separated resource groups the rebalancer manages. Empty: the whole subscription.')
param managedResourceGroupNames string = ''

@description('Comma-separated resource groups holding what the scale sets reference (networks, images, identities) when managedResourceGroupNames is set. Only the linked-access role is assigned there.')
param linkedResourceGroupNames string = ''

@description('Comma-separated ids of other subscriptions holding what the scale sets reference (gallery images, user-assigned identities, networks). The linked-access role is assigned on each; you need to be allowed to create role definitions and assignments there.')
param linkedSubscriptionIds string = ''

@allowed([
  'off'
  'audit'
  'enforce'
])
@description('off: do nothing; audit: report only; enforce: move VMs of opted-in scale sets.')
param mode string = 'audit'

@allowed([
  'audit'
  'enabled'
  'disabled'
])
@description('What untagged zonal scale sets get: audit (report only), enabled (rebalance) or disabled (ignore).')
param defaultOptIn string = 'audit'

@description('NCRONTAB schedule of the audit timer (six fields, with seconds).')
param timerSchedule string = '0 */5 * * * *'

@minValue(1)
@maxValue(100)
@description('VMs one operation may move at once (extra capacity during a move).')
param maxSurge int = 1

@minValue(0)
@maxValue(10080)
@description('Minutes without outside writes to a scale set before a move may start.')
param cooldownMinutes int = 60

@minValue(5)
@maxValue(1440)
@description('Minutes a new VM has to report healthy before the move is rolled back.')
param healthTimeoutMinutes int = 90

@minValue(0)
@maxValue(10080)
@description('Minimum minutes between two moves on one scale set.')
param minMoveIntervalMinutes int = 0

@minValue(1)
@maxValue(100)
@description('Operations allowed in flight at once in the subscription.')
param maxConcurrentOperations int = 5

@minValue(1)
@maxValue(1440)
@description('Minutes between two full audits of the subscription.')
param auditIntervalMinutes int = 60

@minValue(1)
@maxValue(3650)
@description('Days finished operations are kept in Table Storage.')
param historyRetentionDays int = 30

@description('Share of the ARM request budget the app may use, between 0 and 1 (a string: Bicep has no decimals).')
param armBudgetShare string = '0.2'

@description('Create an Event Grid topic for the rebalancer lifecycle notifications.')
param deployNotificationTopic bool = false

@minValue(40)
@maxValue(1000)
@description('Upper bound of Flex Consumption instances.')
param maximumInstanceCount int = 40

@allowed([
  2048
  4096
])
@description('Memory of each Flex Consumption instance.')
param instanceMemoryMB int = 2048

@description('Zone-redundant Flex Consumption plan and storage (ZRS), in a region that offers it. It keeps two always-ready instances per function, billed while idle.')
param zoneRedundant bool = false

@description('Resource id of an action group for the alert rules. Empty: the rules are deployed disabled.')
param alertActionGroupId string = ''

@minValue(30)
@maxValue(2880)
@description('Minutes an opted-in scale set may stay out of balance without an operation before it alerts.')
param imbalanceAlertMinutes int = 240

@minValue(1)
@maxValue(960)
@description('Minutes between two timer runs, as timerSchedule sets them: the "timer stopped" alert fires after three periods without one.')
param timerPeriodMinutes int = 5

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  workload: 'vmss-zone-rebalancer'
}
// Resource group names cannot contain spaces, so removing them tolerates "rg-a, rg-b"; empty
// names ("rg-a," or ",") are dropped: resourceGroup('') would fail the deployment.
var managedResourceGroups = filter(split(replace(managedResourceGroupNames, ' ', ''), ','), name => !empty(name))
var linkedResourceGroups = filter(split(replace(linkedResourceGroupNames, ' ', ''), ','), name => !empty(name))
// This subscription is covered anyway; listing it again would assign the same role twice.
var linkedSubscriptions = filter(split(replace(linkedSubscriptionIds, ' ', ''), ','), id => !empty(id) && toLower(id) != toLower(subscription().subscriptionId))
var linkedSubscriptionScopes = [for id in linkedSubscriptions: '/subscriptions/${id}']
var managesWholeSubscription = empty(managedResourceGroups)
var linkedAccessResourceGroups = union(managedResourceGroups, linkedResourceGroups)
// Resource ids in the managed scope start with these; the event subscription filters on them.
var subjectPrefixes = [for name in managedResourceGroups: '${subscription().id}/resourceGroups/${name}/']

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module app 'modules/app.bicep' = {
  name: 'rebalancer-app'
  scope: rg
  params: {
    location: location
    tags: tags
    namePrefix: namePrefix
    resourceToken: resourceToken
    managedResourceGroups: managedResourceGroups
    mode: mode
    defaultOptIn: defaultOptIn
    timerSchedule: timerSchedule
    maxSurge: maxSurge
    cooldownMinutes: cooldownMinutes
    healthTimeoutMinutes: healthTimeoutMinutes
    minMoveIntervalMinutes: minMoveIntervalMinutes
    maxConcurrentOperations: maxConcurrentOperations
    auditIntervalMinutes: auditIntervalMinutes
    historyRetentionDays: historyRetentionDays
    armBudgetShare: armBudgetShare
    deployNotificationTopic: deployNotificationTopic
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    zoneRedundant: zoneRedundant
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'rebalancer-monitoring'
  scope: rg
  params: {
    location: location
    tags: tags
    namePrefix: namePrefix
    resourceToken: resourceToken
    appInsightsName: app.outputs.appInsightsName
    actionGroupId: alertActionGroupId
    imbalanceAlertMinutes: imbalanceAlertMinutes
    timerPeriodMinutes: timerPeriodMinutes
    auditIntervalMinutes: auditIntervalMinutes
  }
}

// Read, scale and delete instances of scale sets: exactly the actions of the adapter's calls,
// rebalancer.azure_operations.SCALE_SET_ROLE_ACTIONS (tests/test_infra.py compares them).
resource scaleSetRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, environmentName, 'vmss-zone-rebalancer-scale-sets')
  properties: {
    roleName: 'VMSS Zone Rebalancer scale sets (${environmentName}, ${subscription().subscriptionId})'
    description: 'Reads zonal VM scale sets, changes their capacity and deletes surplus instances.'
    type: 'CustomRole'
    assignableScopes: [
      subscription().id
    ]
    permissions: [
      {
        actions: [
          'Microsoft.Compute/virtualMachineScaleSets/read'
          'Microsoft.Compute/virtualMachineScaleSets/rollingUpgrades/read'
          'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read'
          'Microsoft.Compute/virtualMachines/read'
          'Microsoft.Compute/virtualMachineScaleSets/write'
          'Microsoft.Compute/virtualMachineScaleSets/delete/action'
          'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/instanceView/read'
          'Microsoft.Compute/virtualMachines/instanceView/read'
          'Microsoft.Compute/locations/operations/read'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
  }
}

// Quota, SKU availability and autoscale settings are subscription-level reads: always assigned
// on the subscription.
// Exactly rebalancer.azure_operations.SUBSCRIPTION_READ_ROLE_ACTIONS.
resource subscriptionReadRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, environmentName, 'vmss-zone-rebalancer-subscription-reads')
  properties: {
    roleName: 'VMSS Zone Rebalancer subscription reads (${environmentName}, ${subscription().subscriptionId})'
    description: 'Reads compute quota, the zones that offer each VM size, and autoscale settings.'
    type: 'CustomRole'
    assignableScopes: [
      subscription().id
    ]
    permissions: [
      {
        actions: [
          'Microsoft.Compute/skus/read'
          'Microsoft.Compute/locations/usages/read'
          'Microsoft.Insights/autoscalesettings/read'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
  }
}

// Linked access checks a capacity change repeats on what the scale set references: exactly
// rebalancer.azure_operations.LINKED_ACCESS_ROLE_ACTIONS.
resource linkedAccessRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, environmentName, 'vmss-zone-rebalancer-linked-access')
  properties: {
    roleName: 'VMSS Zone Rebalancer linked access (${environmentName}, ${subscription().subscriptionId})'
    description: 'Lets a scale-out reuse the subnets, load balancers, images and identities its scale set references.'
    type: 'CustomRole'
    assignableScopes: concat([subscription().id], linkedSubscriptionScopes)
    permissions: [
      {
        actions: [
          'Microsoft.Network/virtualNetworks/subnets/join/action'
          'Microsoft.Network/networkSecurityGroups/join/action'
          'Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action'
          'Microsoft.Network/loadBalancers/backendAddressPools/join/action'
          'Microsoft.Network/loadBalancers/inboundNatPools/join/action'
          'Microsoft.Network/loadBalancers/probes/join/action'
          'Microsoft.Network/applicationGateways/backendAddressPools/join/action'
          'Microsoft.Network/publicIPPrefixes/join/action'
          'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action'
          'Microsoft.Compute/galleries/images/read'
          'Microsoft.Compute/galleries/images/versions/read'
          'Microsoft.Compute/images/read'
          'Microsoft.Compute/diskEncryptionSets/read'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
  }
}

// At subscription scope through a module, so that each assignment is named from its principal:
// these outlive `azd down`, and the next `azd up` assigns the roles to a new identity.
module scaleSetRoleOnSubscription 'modules/subscription-role-assignment.bicep' = if (managesWholeSubscription) {
  name: 'rebalancer-scale-sets-${resourceToken}'
  params: {
    roleDefinitionId: scaleSetRole.id
    principalId: app.outputs.identityPrincipalId
    assignmentDescription: 'VMSS zone rebalancer: manage the zone balance of scale sets in this subscription.'
  }
}

module subscriptionReadRoleOnSubscription 'modules/subscription-role-assignment.bicep' = {
  name: 'rebalancer-subscription-reads-${resourceToken}'
  params: {
    roleDefinitionId: subscriptionReadRole.id
    principalId: app.outputs.identityPrincipalId
    assignmentDescription: 'VMSS zone rebalancer: compute quota and SKU availability.'
  }
}

module linkedAccessRoleOnSubscription 'modules/subscription-role-assignment.bicep' = if (managesWholeSubscription) {
  name: 'rebalancer-linked-access-${resourceToken}'
  params: {
    roleDefinitionId: linkedAccessRole.id
    principalId: app.outputs.identityPrincipalId
    assignmentDescription: 'VMSS zone rebalancer: linked access checks of scale-outs.'
  }
}

module scaleSetRoleOnResourceGroups 'modules/role-assignment.bicep' = [
  for name in managedResourceGroups: {
    name: 'rebalancer-scale-sets-${uniqueString(environmentName, name)}'
    scope: resourceGroup(name)
    params: {
      roleDefinitionId: scaleSetRole.id
      principalId: app.outputs.identityPrincipalId
      assignmentDescription: 'VMSS zone rebalancer: manage the zone balance of scale sets in this resource group.'
    }
  }
]

module linkedAccessRoleOnResourceGroups 'modules/role-assignment.bicep' = [
  for name in (managesWholeSubscription ? [] : linkedAccessResourceGroups): {
    name: 'rebalancer-linked-access-${uniqueString(environmentName, name)}'
    scope: resourceGroup(name)
    params: {
      roleDefinitionId: linkedAccessRole.id
      principalId: app.outputs.identityPrincipalId
      assignmentDescription: 'VMSS zone rebalancer: linked access checks of scale-outs.'
    }
  }
]

// Scale sets may use gallery images, identities or networks of other subscriptions; a scale-out
// re-checks access to them there (LinkedAuthorizationFailed otherwise).
module linkedAccessRoleOnSubscriptions 'modules/subscription-role-assignment.bicep' = [
  for id in linkedSubscriptions: {
    name: 'rebalancer-linked-access-${uniqueString(environmentName, id)}'
    scope: subscription(id)
    params: {
      // The custom role's id as seen from that subscription, one of its assignable scopes.
      roleDefinitionId: '/subscriptions/${id}/providers/Microsoft.Authorization/roleDefinitions/${linkedAccessRole.name}'
      principalId: app.outputs.identityPrincipalId
      assignmentDescription: 'VMSS zone rebalancer: linked access checks of scale-outs in ${subscription().subscriptionId}.'
    }
  }
]

// azd reads these into the environment; infra/hooks/postdeploy.sh uses them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = app.outputs.functionAppName
output AZURE_STORAGE_ACCOUNT_NAME string = app.outputs.storageAccountName
output REBALANCER_SYSTEM_TOPIC_NAME string = app.outputs.systemTopicName
output REBALANCER_DEAD_LETTER_CONTAINER string = app.outputs.deadLetterContainerName
output REBALANCER_SUBJECT_PREFIXES string = join(subjectPrefixes, ',')
output REBALANCER_APP_PRINCIPAL_ID string = app.outputs.identityPrincipalId
