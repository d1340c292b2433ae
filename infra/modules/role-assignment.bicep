// Assigns one role to the rebalancer's identity on the resource group this module is scoped to.
targetScope = 'resourceGroup'

@description('Resource id of the role definition to assign.')
param roleDefinitionId string

@description('Object id of the rebalancer identity.')
param principalId string

@description('Why the assignment exists, shown in the portal.')
param assignmentDescription string

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, principalId, roleDefinitionId)
  properties: {
    roleDefinitionId: roleDefinitionId
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: assignmentDescription
  }
}
