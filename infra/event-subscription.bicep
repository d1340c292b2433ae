// The Event Grid subscription from the subscription's system topic to the rebalancer's Event
// Grid function. Deployed by infra/hooks/postdeploy.sh after `azd deploy`, because Event Grid
// checks that the target function exists when the subscription is created or updated.
targetScope = 'resourceGroup'

@description('System topic for the subscription\'s resource events (output of main.bicep).')
param systemTopicName string

@description('Name of the rebalancer function app.')
param functionAppName string

@description('Event Grid triggered function: rebalancer.azure_operations.EVENT_GRID_FUNCTION_NAME.')
param functionName string = 'on_resource_event'

@description('Storage account of the app, which holds the dead-letter container.')
param storageAccountName string

@description('Blob container for events that could not be delivered.')
param deadLetterContainerName string = 'eventgrid-deadletter'

@description('Comma-separated resource id prefixes (/subscriptions/<id>/resourceGroups/<name>/) to narrow the events to; empty for the whole subscription.')
param subjectPrefixes string = ''

// Exactly rebalancer.azure_operations.HANDLED_OPERATION_NAMES (tests/test_infra.py).
var operationNameFilter = {
  operatorType: 'StringIn'
  key: 'data.operationName'
  values: [
    'Microsoft.Compute/virtualMachineScaleSets/write'
    'Microsoft.Compute/virtualMachineScaleSets/delete'
    'Microsoft.Compute/virtualMachineScaleSets/delete/action'
    'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write'
    'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/delete'
    'Microsoft.Compute/virtualMachines/write'
    'Microsoft.Compute/virtualMachines/delete'
    'Microsoft.Compute/virtualMachineScaleSets/deallocate/action'
    'Microsoft.Compute/virtualMachineScaleSets/powerOff/action'
    'Microsoft.Compute/virtualMachineScaleSets/start/action'
    'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/deallocate/action'
    'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/powerOff/action'
    'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/start/action'
    'Microsoft.Compute/virtualMachines/deallocate/action'
    'Microsoft.Compute/virtualMachines/powerOff/action'
    'Microsoft.Compute/virtualMachines/start/action'
  ]
}

// Event Grid allows 25 filter values per subscription in all; the operation names use 16.
var prefixes = empty(subjectPrefixes) ? [] : split(subjectPrefixes, ',')
var maxPrefixes = 9
var subjectFilter = {
  operatorType: 'StringBeginsWith'
  key: 'subject'
  values: prefixes
}
var subjectFilters = (empty(prefixes) || length(prefixes) > maxPrefixes) ? [] : [subjectFilter]

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource eventSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: 'vmss-zone-rebalancer'
  properties: {
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${functionApp.id}/functions/${functionName}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Resources.ResourceWriteSuccess'
        'Microsoft.Resources.ResourceDeleteSuccess'
        'Microsoft.Resources.ResourceActionSuccess'
      ]
      enableAdvancedFilteringOnArrays: true
      advancedFilters: concat([operationNameFilter], subjectFilters)
    }
    // Deliveries are retried for a day; what still fails is kept for inspection. The timer's
    // audit catches up on anything missed either way.
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: storage.id
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

output eventSubscriptionId string = eventSubscription.id
