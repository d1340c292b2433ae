// Assigns one role to the rebalancer's identity on the subscription this module is scoped to.
// A module because the assignment's name must depend on the principal id (an assignment keeps
// its principal for life, and subscription-scope assignments outlive `azd down`), and a name
// must be known when a deployment starts: the new identity's id is, inside a module.
targetScope = 'subscription'

@description('Resource id of the role definition to assign.')
param roleDefinitionId string

@description('Object id of the rebalancer identity.')
param principalId string

@description('Why the assignment exists, shown in the portal.')
param assignmentDescription string

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, principalId, roleDefinitionId)
  properties: {
    roleDefinitionId: roleDefinitionId
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: assignmentDescription
  }
}
