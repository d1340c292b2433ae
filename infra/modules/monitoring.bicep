// What operators look at in Azure Monitor: a workbook over the app's Application Insights and
// three log search alert rules. Every query reads the app's documented log lines
// (docs/observability.md) and lives in monitoring/*.kql; tests/test_monitoring.py runs the demo
// and checks that each message shape, metric and dimension these queries use is emitted.
targetScope = 'resourceGroup'

param location string
param tags object
param namePrefix string
param resourceToken string

@description('Name of the app\'s Application Insights component, in this resource group.')
param appInsightsName string

@description('Resource id of the action group the alerts notify. Empty: the alert rules are deployed disabled.')
param actionGroupId string

@description('Minutes an opted-in scale set may stay out of balance without an operation before it alerts.')
param imbalanceAlertMinutes int

@description('Minutes between two timer runs, as REBALANCER_TIMER_SCHEDULE sets them.')
param timerPeriodMinutes int

@description('Minutes between two audits (REBALANCER_AUDIT_INTERVAL_MINUTES).')
param auditIntervalMinutes int

var alertsEnabled = !empty(actionGroupId)
var actions = alertsEnabled ? { actionGroups: [actionGroupId] } : {}
// Alert queries filter by time themselves; a rule's window (one of the durations Azure
// Monitor accepts) only has to cover what its query looks at.
var windowSizes = [
  { minutes: 15, duration: 'PT15M' }
  { minutes: 30, duration: 'PT30M' }
  { minutes: 60, duration: 'PT1H' }
  { minutes: 120, duration: 'PT2H' }
  { minutes: 180, duration: 'PT3H' }
  { minutes: 360, duration: 'PT6H' }
  { minutes: 1440, duration: 'P1D' }
  { minutes: 2880, duration: 'P2D' }
]
var imbalanceLookbackMinutes = max(imbalanceAlertMinutes, auditIntervalMinutes + 15)
var imbalanceWindow = first(filter(windowSizes, w => w.minutes >= imbalanceLookbackMinutes)).duration
var timerWindow = first(filter(windowSizes, w => w.minutes >= 3 * timerPeriodMinutes)).duration

var queries = {
  lastAudit: loadTextContent('monitoring/last-audit.kql')
  imbalanced: loadTextContent('monitoring/imbalanced.kql')
  zones: loadTextContent('monitoring/zones.kql')
  operations: loadTextContent('monitoring/operations.kql')
  outcomes: loadTextContent('monitoring/outcomes.kql')
  backoffs: loadTextContent('monitoring/backoffs.kql')
  throttling: loadTextContent('monitoring/throttling.kql')
}

var operationFailedQuery = loadTextContent('monitoring/alert-operation-failed.kql')
var imbalanceTemplate = loadTextContent('monitoring/alert-imbalance-stuck.kql')
var imbalanceQuery = replace(replace(imbalanceTemplate, '{thresholdMinutes}', string(imbalanceAlertMinutes)), '{lookbackMinutes}', string(auditIntervalMinutes + 15))
var timerQuery = replace(loadTextContent('monitoring/alert-timer-stopped.kql'), '{windowMinutes}', string(3 * timerPeriodMinutes))

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

var timeRange = {
  id: 'time-range'
  version: 'KqlParameterItem/1.0'
  name: 'TimeRange'
  label: 'Time range'
  type: 4
  isRequired: true
  value: {
    durationMs: 86400000
  }
  typeSettings: {
    selectableValues: [
      { durationMs: 3600000 }
      { durationMs: 14400000 }
      { durationMs: 86400000 }
      { durationMs: 604800000 }
      { durationMs: 2592000000 }
    ]
    allowCustom: true
  }
}

var workbookContent = {
  version: 'Notebook/1.0'
  items: [
    {
      type: 9
      name: 'parameters'
      content: {
        version: 'KqlParameterItem/1.0'
        parameters: [
          timeRange
        ]
        style: 'pills'
        queryType: 0
        resourceType: 'microsoft.insights/components'
      }
    }
    {
      type: 1
      name: 'introduction'
      content: {
        json: '## VMSS zone rebalancer\nWhat the rebalancer saw and did, from its log lines in Application Insights. docs/observability.md of the project explains each tile.'
      }
    }
    {
      type: 3
      name: 'last-audit'
      customWidth: '40'
      content: {
        version: 'KqlItem/1.0'
        title: 'Last audit of the subscription'
        query: queries.lastAudit
        size: 0
        timeContextFromParameter: 'TimeRange'
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: 'table'
      }
    }
    {
      type: 3
      name: 'imbalanced'
      customWidth: '60'
      content: {
        version: 'KqlItem/1.0'
        title: 'Out of balance now, and since when'
        query: queries.imbalanced
        size: 0
        timeContextFromParameter: 'TimeRange'
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: 'table'
      }
    }
    {
      type: 3
      name: 'zones'
      customWidth: '100'
      content: {
        version: 'KqlItem/1.0'
        title: 'VMs per zone of every scale set (total and active)'
        query: queries.zones
        size: 0
        timeContextFromParameter: 'TimeRange'
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: 'timechart'
      }
    }
    {
      type: 3
      name: 'operations'
      customWidth: '60'
      content: {
        version: 'KqlItem/1.0'
        title: 'Operations: every state change, its reason and detail'
        query: queries.operations
        size: 0
        timeContextFromParameter: 'TimeRange'
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: 'table'
      }
    }
    {
      type: 3
      name: 'outcomes'
      customWidth: '40'
      content: {
        version: 'KqlItem/1.0'
        title: 'Operations ended, by outcome'
        query: queries.outcomes
        size: 0
        timeContextFromParameter: 'TimeRange'
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: 'barchart'
      }
    }
    {
      type: 3
      name: 'backoffs'
      customWidth: '50'
      content: {
        version: 'KqlItem/1.0'
        title: 'Zones backed off (no capacity for the size)'
        query: queries.backoffs
        size: 0
        timeContextFromParameter: 'TimeRange'
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: 'table'
      }
    }
    {
      type: 3
      name: 'throttling'
      customWidth: '50'
      content: {
        version: 'KqlItem/1.0'
        title: 'Throttled by Azure Compute (calls and Retry-After)'
        query: queries.throttling
        size: 0
        timeContextFromParameter: 'TimeRange'
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: 'timechart'
      }
    }
  ]
  fallbackResourceIds: [
    appInsights.id
  ]
  '$schema': 'https://github.com/Microsoft/Application-Insights-Workbooks/blob/master/schema/workbook.json'
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appInsights.id, 'vmss-zone-rebalancer-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'VMSS zone rebalancer'
    category: 'workbook'
    sourceId: appInsights.id
    serializedData: string(workbookContent)
    version: '1.0'
  }
}

resource operationFailedAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-alert-operation-failed-${resourceToken}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Zone rebalancer: an operation failed or rolled back'
    description: 'An operation ended failed (Azure refused a call: quota, size, permissions) or rolled back (no capacity in the zone it needed, new VMs that failed to provision or never turned healthy; not a placement tie). docs/observability.md says what to do.'
    severity: 2
    enabled: alertsEnabled
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: operationFailedQuery
          timeAggregation: 'Count'
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
    actions: actions
  }
}

resource imbalanceAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-alert-imbalance-${resourceToken}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Zone rebalancer: a scale set stays out of balance'
    description: 'An opted-in scale set has been out of balance for longer than ${imbalanceAlertMinutes} minutes and no operation ran on it in that time. docs/observability.md says what to do.'
    severity: 2
    enabled: alertsEnabled
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: imbalanceWindow
    criteria: {
      allOf: [
        {
          query: imbalanceQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: actions
  }
}

resource timerStoppedAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-alert-timer-stopped-${resourceToken}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Zone rebalancer: the timer stopped running'
    description: 'No timer run in the last ${3 * timerPeriodMinutes} minutes (three schedule periods): the app is down, stopped or cannot start. docs/observability.md says what to do.'
    severity: 1
    enabled: alertsEnabled
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: timerWindow
    criteria: {
      allOf: [
        {
          query: timerQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: actions
  }
}

output workbookId string = workbook.id
output alertRuleNames array = [
  operationFailedAlert.name
  imbalanceAlert.name
  timerStoppedAlert.name
]
